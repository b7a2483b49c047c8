/**
 * Volumes and disk-size benchmark on bare QEMU started through src/vmm (no daemon), as the
 * engine would start it (root dropping to hutch-vm when run as root):
 * - boot (spawn → agent answers) without volumes, with two volumes, and on an 8 GiB overlay
 *   (the agent grows the 2 GiB root ext4 first; its own log says how long the ioctl took);
 * - sequential write (dd, fsync) and read (caches dropped) of a file on a 9p volume against one
 *   on the root disk.
 *
 *   npm run bench:volumes [-- --runs 7 --mib 128]
 */
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { type AgentConnection, connectAgent } from '../src/guest/agent-connection.js';
import { TemplateBuilder, type TemplateManifest } from '../src/images/builder.js';
import { createOverlay } from '../src/vmm/disk.js';
import { tcgTimingArgs } from '../src/vmm/host.js';
import { standardMachine } from '../src/vmm/machine-spec.js';
import { killAndWait, launchQemu, runPaths } from '../src/vmm/qemu.js';
import { prepareRunDir } from '../src/vmm/run-dir.js';
import type { Volume } from '../src/vmm/volumes.js';
import { imageDir } from '../test/helpers/daemon.js';
import { median, quantile } from './bench-lib.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '7' }, mib: { type: 'string', default: '128' } },
});
const runs = Number(values.runs);
const mib = Number(values.mib);

type User = { user: string; uid: number; gid: number };

function hutchVm(): User | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const line = readFileSync('/etc/passwd', 'utf8')
    .split('\n')
    .find((l) => l.startsWith('hutch-vm:'));
  const [, , uid, gid] = line?.split(':') ?? [];
  return line ? { user: 'hutch-vm', uid: Number(uid), gid: Number(gid) } : undefined;
}

interface Vm {
  agent: AgentConnection;
  bootMs: number;
  growMs: number | undefined;
  stop: () => Promise<void>;
}

let seq = 0;

async function boot(
  m: TemplateManifest,
  work: string,
  user: User | undefined,
  volumes: Volume[],
  size?: number,
): Promise<Vm> {
  const dir = join(work, `run${seq++}`);
  prepareRunDir(dir, user);
  const disk = join(dir, 'disk.qcow2');
  await createOverlay(m.rootfs, disk, 'raw', user, size);
  const p = runPaths(dir);
  const t0 = performance.now();
  const pid = launchQemu('qemu-system-x86_64', {
    id: `bench-vol-${process.pid}-${seq}`,
    accel: 'tcg',
    machine: standardMachine({
      vcpus: 1,
      memoryMb: 256,
      disk,
      agentSocket: p.agent,
      consoleSocket: p.console,
      volumes,
    }),
    kernel: m.kernel,
    cmdline: `${m.cmdline} ${tcgTimingArgs(m.kernelHz)} hutch.hostname=bench`,
    runDir: dir,
    ...(user ? { runAs: user.user } : {}),
  });
  let out = '';
  let tap: Socket | undefined;
  const until = Date.now() + 10_000;
  const attach = (): void => {
    const s = connect(p.console);
    s.on('connect', () => {
      tap = s;
    });
    s.on('data', (b) => {
      out += b.toString('latin1');
    });
    s.on('error', () => {
      if (!tap && Date.now() < until) setTimeout(attach, 5);
    });
  };
  while (!existsSync(p.console) && Date.now() < until) await new Promise((r) => setTimeout(r, 2));
  attach();
  const stop = async (): Promise<void> => {
    tap?.destroy();
    await killAndWait(pid);
  };
  try {
    const agent = await connectAgent(p.agent, { timeoutMs: 60_000 });
    const bootMs = performance.now() - t0;
    const grew = /grew \/ from \d+ to \d+ blocks of \d+ in (\d+) ms/.exec(out);
    return { agent, bootMs, growMs: grew ? Number(grew[1]) : undefined, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

async function sh(vm: Vm, cmd: string): Promise<string> {
  const r = await vm.agent.execCollect(
    { argv: ['sh', '-c', cmd], timeoutMs: 300_000 },
    { maxOutputBytes: 65536 },
  );
  if (r.exitCode !== 0) throw new Error(`${cmd}: ${r.stderr.toString()}`);
  return r.stdout.toString();
}

const line = (name: string, xs: number[]): void =>
  console.log(
    `${name.padEnd(40)} median=${median(xs).toFixed(0)}ms p90=${quantile(xs, 0.9).toFixed(0)}ms n=${xs.length}`,
  );

async function main(): Promise<void> {
  const m = await new TemplateBuilder(imageDir).build('python');
  const user = hutchVm();
  const work = mkdtempSync(join(tmpdir(), 'hutch-bench-vol-'));
  chmodSync(work, 0o711);
  const volumes: Volume[] = ['a', 'b'].map((tag) => {
    const d = join(work, tag);
    mkdirSync(d);
    if (user) chownSync(d, user.uid, user.gid);
    return { tag, hostPath: d, guestPath: `/mnt/${tag}`, readonly: tag === 'b' };
  });
  const plain: number[] = [];
  const withVols: number[] = [];
  const grown: number[] = [];
  const growIoctl: number[] = [];
  try {
    // Interleaved, so that drift in host load hits all three alike.
    for (let i = 0; i < runs; i++) {
      for (const [xs, vols, size] of [
        [plain, [], undefined],
        [withVols, volumes, undefined],
        [grown, [], 8 * 2 ** 30],
      ] as const) {
        const vm = await boot(m, work, user, [...vols], size);
        xs.push(vm.bootMs);
        if (vm.growMs !== undefined) growIoctl.push(vm.growMs);
        vm.agent.close();
        await vm.stop();
      }
    }
    line('boot, no volumes', plain);
    line('boot, 2 volumes', withVols);
    line('boot, 8 GiB disk (grows / from 2 GiB)', grown);
    line('  of which EXT4_IOC_RESIZE_FS', growIoctl);

    const vm = await boot(m, work, user, volumes);
    try {
      for (const [name, dir] of [
        ['9p volume', '/mnt/a'],
        ['root disk', '/root'],
      ] as const) {
        const rate = async (cmd: string): Promise<string> =>
          /, ([\d.]+ [kMG]?B\/s)/.exec(await sh(vm, `${cmd} 2>&1 | tail -1`))?.[1] ?? '?';
        const f = `${dir}/bench`;
        const w = await rate(`dd if=/dev/zero of=${f} bs=1M count=${mib} conv=fsync`);
        const r = await rate(`sync; echo 3 > /proc/sys/vm/drop_caches; dd if=${f} of=/dev/null bs=1M`);
        await sh(vm, `rm ${f}`);
        console.log(`${`${name}, ${mib} MiB dd`.padEnd(40)} write=${w} read=${r}`);
      }
    } finally {
      vm.agent.close();
      await vm.stop();
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
