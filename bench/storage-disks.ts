/**
 * Attachable disks benchmark against the real daemon. Medians over N runs, baselines measured
 * in the same process:
 *   - AttachDisk → mounted (the REST call's round trip, hot-plug + mount included), and detach,
 *     vs an exec of `true` on the same machine (the floor of any call that reaches the guest);
 *   - sequential write and read (256 MiB, direct I/O, dd) and random 4 KiB reads and writes
 *     (a python loop with O_DIRECT, 4,000 ops) on an attached disk vs the machine's root disk;
 *   - a branch of a machine with 256 MiB written to a read-write disk attached (copied by the
 *     source's QEMU after it continues) vs a machine that wrote as much to its root disk and has
 *     no disk attached.
 *
 *   npm run bench:storage-disks [-- --runs 5]
 */
import { parseArgs } from 'node:util';
import { api, cleanup, startDaemon, type TestDaemon } from '../test/helpers/daemon.js';
import { median } from './bench-lib.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' } } });
const runs = Number(values.runs);

function line(name: string, value: number, unit: string, base?: number, baseName = 'baseline'): void {
  const ratio = base ? ` (${(value / base).toFixed(2)}× ${baseName})` : '';
  console.log(`${name.padEnd(60)} ${value.toFixed(unit === 'ms' ? 1 : 2)} ${unit}${ratio}`);
}

async function call(
  d: TestDaemon,
  method: string,
  path: string,
  body?: unknown,
): Promise<Record<string, unknown>> {
  const r = await api(d.url, method, path, body);
  if (r.status >= 300) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}

async function exec(d: TestDaemon, id: string, cmd: string): Promise<string> {
  const r = await call(d, 'POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 600_000 });
  if (r.exit_code !== 0) throw new Error(`${cmd.slice(0, 80)}: ${JSON.stringify(r).slice(0, 400)}`);
  return String(r.stdout).trim();
}

const timed = async (f: () => Promise<unknown>): Promise<number> => {
  const t = performance.now();
  await f();
  return performance.now() - t;
};

/** MB/s of `dd` (its own summary line), direct I/O so the guest's page cache is not measured. */
const ddRate = (out: string): number => {
  const m = /([\d.]+) ([kMG]?B)\/s/.exec(out);
  if (!m) throw new Error(`dd said: ${out}`);
  return Number(m[1]) * ({ kB: 1e-3, MB: 1, GB: 1e3, B: 1e-6 }[m[2] as string] ?? 1);
};

const randomIo = (file: string, write: boolean): string => `python3 - <<'PY'
import os, mmap, random, time
fd = os.open(${JSON.stringify(file)}, os.O_RDWR | os.O_DIRECT)
size = os.fstat(fd).st_size
buf = mmap.mmap(-1, 4096)
random.seed(1)
t = time.perf_counter()
for _ in range(4000):
    off = random.randrange(size // 4096) * 4096
    os.pwritev(fd, [buf], off) if ${write ? 'True' : 'False'} else os.preadv(fd, [buf], off)
if ${write ? 'True' : 'False'}: os.fsync(fd)
print(4000 / (time.perf_counter() - t))
PY`;

async function main(): Promise<void> {
  const d = await startDaemon();
  try {
    const m = (
      await call(d, 'POST', '/v1/machines', { template: 'python', ttl_seconds: 3600, name: 'bench' })
    ).id as string;
    const disk = (await call(d, 'POST', '/v1/disks', { name: 'bench', size_bytes: 2 * 2 ** 30 }))
      .disk_id as string;
    const attach: number[] = [];
    const detach: number[] = [];
    const execMs: number[] = [];
    for (let i = 0; i < runs; i++) {
      attach.push(await timed(() => call(d, 'POST', `/v1/machines/${m}/disks`, { disk, mount_path: '/d' })));
      detach.push(await timed(() => call(d, 'DELETE', `/v1/machines/${m}/disks/${disk}`)));
      execMs.push(await timed(() => exec(d, m, 'true')));
    }
    line('attach disk → mounted (REST)', median(attach), 'ms', median(execMs), 'exec true');
    line('detach disk (unmount + unplug)', median(detach), 'ms', median(execMs), 'exec true');

    await call(d, 'POST', `/v1/machines/${m}/disks`, { disk, mount_path: '/d' });
    const seq = {
      diskW: [] as number[],
      diskR: [] as number[],
      rootW: [] as number[],
      rootR: [] as number[],
    };
    const rnd = {
      diskW: [] as number[],
      diskR: [] as number[],
      rootW: [] as number[],
      rootR: [] as number[],
    };
    for (let i = 0; i < runs; i++)
      for (const [where, dir] of [
        ['disk', '/d'],
        ['root', '/root'],
      ] as const) {
        const f = `${dir}/seq.bin`;
        const w = await exec(
          d,
          m,
          `dd if=/dev/zero of=${f} bs=1M count=256 oflag=direct conv=fsync 2>&1 | tail -1`,
        );
        const r = await exec(d, m, `dd if=${f} of=/dev/null bs=1M iflag=direct 2>&1 | tail -1`);
        seq[`${where}W`].push(ddRate(w));
        seq[`${where}R`].push(ddRate(r));
        rnd[`${where}W`].push(Number(await exec(d, m, randomIo(f, true))));
        rnd[`${where}R`].push(Number(await exec(d, m, randomIo(f, false))));
        await exec(d, m, `rm -f ${f}`);
      }
    line(
      'sequential write 256 MiB, attached disk',
      median(seq.diskW),
      'MB/s',
      median(seq.rootW),
      'root disk',
    );
    line('sequential read 256 MiB, attached disk', median(seq.diskR), 'MB/s', median(seq.rootR), 'root disk');
    line('random 4 KiB writes, attached disk', median(rnd.diskW), 'IOPS', median(rnd.rootW), 'root disk');
    line('random 4 KiB reads, attached disk', median(rnd.diskR), 'IOPS', median(rnd.rootR), 'root disk');

    // Branch: the read-write disk is copied while the source is stopped.
    await exec(d, m, 'head -c 256M /dev/urandom > /d/full.bin && sync');
    const withDisk: { ms: number; pause: number }[] = [];
    const without: { ms: number; pause: number }[] = [];
    const other = (await call(d, 'POST', '/v1/machines', { template: 'python', ttl_seconds: 3600 }))
      .id as string;
    // The same 256 MiB written to its root disk: both guests' memory holds as much page cache,
    // so the difference is the attached disk's copy, not a bigger RAM copy.
    await exec(d, other, 'head -c 256M /dev/urandom > /root/full.bin && sync');
    for (let i = 0; i < runs; i++)
      for (const [src, into] of [
        [m, withDisk],
        [other, without],
      ] as const) {
        const t = performance.now();
        const b = await call(d, 'POST', `/v1/machines/${src}/branch`, {});
        into.push({ ms: performance.now() - t, pause: b.pause_ms as number });
        await call(d, 'DELETE', `/v1/machines/${b.id}`);
      }
    line(
      'branch with a 256 MiB-full rw disk attached',
      median(withDisk.map((x) => x.ms)),
      'ms',
      median(without.map((x) => x.ms)),
      'no disk',
    );
    line(
      "  its source's pause",
      median(withDisk.map((x) => x.pause)),
      'ms',
      median(without.map((x) => x.pause)),
      'no disk',
    );
  } finally {
    await cleanup(d);
  }
}

await main();
