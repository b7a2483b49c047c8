/** Shared by the benchmarks: statistics, and the bare QEMU command line the baselines use. */

export function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))] ?? Number.NaN;
}

export const median = (xs: number[]): number => quantile(xs, 0.5);

/** One latency figure as a line: median, p99, count, and the ratio to `base` when given. */
export function latencyLine(name: string, xs: number[], base?: number[], width = 48): void {
  const ratio = base ? ` ratio=${(median(xs) / median(base)).toFixed(2)}x` : '';
  console.log(
    `${name.padEnd(width)} median=${median(xs).toFixed(2)}ms p99=${quantile(xs, 0.99).toFixed(2)}ms n=${xs.length}${ratio}`,
  );
}

/** `n` timed runs of `f` (ms each), after `warm` untimed ones. */
export async function timedRuns(n: number, f: () => Promise<unknown>, warm = 10): Promise<number[]> {
  for (let i = 0; i < warm; i++) await f();
  const xs: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await f();
    xs.push(performance.now() - t);
  }
  return xs;
}

/**
 * A minimal QEMU microvm command line written out here rather than taken from src/vmm, so the
 * baseline measures QEMU itself and not the daemon's choices. Devices sit on the same
 * virtio-mmio buses as the daemon's, which a snapshot restore needs to match.
 */
export function bareQemuArgs(o: {
  kernel: string;
  cmdline: string;
  disk: string;
  agentSock: string;
  /** Restore: map this memory file privately, and wait for a migration stream. */
  restore?: { mem: string; qmpSock: string; consoleSock: string };
}): string[] {
  const memory = o.restore
    ? ['-object', `memory-backend-file,id=mem,size=256M,mem-path=${o.restore.mem},share=off`]
    : ['-object', 'memory-backend-ram,id=mem,size=256M'];
  const tail = o.restore
    ? [
        '-chardev',
        `socket,id=ser0,path=${o.restore.consoleSock},server=on,wait=off`,
        '-serial',
        'chardev:ser0',
        '-qmp',
        `unix:${o.restore.qmpSock},server=on,wait=off`,
        '-incoming',
        'defer',
        '-S',
      ]
    : ['-serial', 'null'];
  return [
    '-M',
    'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem',
    '-global',
    'virtio-mmio.force-legacy=false',
    '-accel',
    'tcg,tb-size=64',
    '-cpu',
    'max',
    '-smp',
    '1',
    '-m',
    '256M',
    ...memory,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-kernel',
    o.kernel,
    '-append',
    o.cmdline,
    '-drive',
    `id=root,file=${o.disk},format=qcow2,if=none`,
    '-device',
    'virtio-blk-device,drive=root,bus=virtio-mmio-bus.7',
    '-device',
    'virtio-serial-device,max_ports=2,bus=virtio-mmio-bus.6',
    '-chardev',
    `socket,id=agent,path=${o.agentSock},server=on,wait=off`,
    '-device',
    'virtserialport,chardev=agent,name=org.hutch.agent.0',
    '-object',
    'rng-random,id=rng0,filename=/dev/urandom',
    '-device',
    'virtio-rng-device,rng=rng0,bus=virtio-mmio-bus.5',
    ...tail,
  ];
}
