/**
 * Snapshot benchmark, through the real daemon under whatever accelerator it picks. Each figure
 * is the median and p99 over N runs, in ms and as a ratio to the cold boot measured in this
 * same run; the baseline for restores is a bare QEMU restore of the same snapshot started by
 * this script (spawn → state loaded → agent answers → first exec).
 *
 *   npm run bench:snapshot [-- --runs 20]
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { connectAgent } from '../src/guest/agent-connection.js';
import { TemplateBuilder } from '../src/images/builder.js';
import { createOverlay } from '../src/vmm/disk.js';
import { loadState } from '../src/vmm/migration.js';
import { QmpClient } from '../src/vmm/qmp.js';
import {
  api,
  cleanup,
  imageDir,
  qemusOf,
  startDaemon,
  type TestDaemon,
  waitFor,
} from '../test/helpers/daemon.js';
import { bareQemuArgs, median, quantile } from './bench-lib.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '20' } } });
const runs = Number(values.runs);

let coldMedian = Number.NaN;
function line(name: string, xs: number[], unit = 'ms'): void {
  const ratio =
    unit === 'ms' && Number.isFinite(coldMedian)
      ? ` ratio_to_cold=${(median(xs) / coldMedian).toFixed(3)}`
      : '';
  console.log(
    `${name.padEnd(40)} median=${median(xs).toFixed(unit === 'ms' ? 1 : 3)}${unit} p99=${quantile(xs, 0.99).toFixed(unit === 'ms' ? 1 : 3)}${unit} n=${xs.length}${ratio}`,
  );
}

async function exec(d: TestDaemon, id: string, cmd: string[] = ['true']): Promise<void> {
  const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd });
  if (r.body.exit_code !== 0) throw new Error(`exec failed: ${JSON.stringify(r.body)}`);
}

async function create(d: TestDaemon, body: Record<string, unknown>): Promise<Record<string, unknown>> {
  const r = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600, ...body });
  if (r.status !== 201) throw new Error(JSON.stringify(r.body));
  return r.body;
}

/** The baseline: QEMU restoring the template snapshot, driven directly (no daemon). */
async function bareRestore(
  snap: { mem: string; state: string; disk: string },
  kernel: string,
  cmdline: string,
): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-bench-'));
  try {
    await createOverlay(snap.disk, join(dir, 'disk.qcow2'), 'qcow2');
    const t0 = performance.now();
    const qemu = spawn(
      'qemu-system-x86_64',
      bareQemuArgs({
        kernel,
        cmdline,
        disk: join(dir, 'disk.qcow2'),
        agentSock: join(dir, 'agent.sock'),
        restore: { mem: snap.mem, qmpSock: join(dir, 'qmp.sock'), consoleSock: join(dir, 'console.sock') },
      }),
      { stdio: 'ignore' },
    );
    try {
      const qmp = await QmpClient.connect(join(dir, 'qmp.sock'), 10_000);
      await loadState(qmp, dir, snap.state, { ignoreShared: true });
      await qmp.execute('cont');
      const conn = await connectAgent(join(dir, 'agent.sock'), { timeoutMs: 30_000 });
      await conn.reset();
      const r = await conn.execCollect({ argv: ['true'] }, { maxOutputBytes: 1024 });
      if (r.exitCode !== 0) throw new Error('bare exec failed');
      const ms = performance.now() - t0;
      conn.close();
      qmp.close();
      return ms;
    } finally {
      qemu.kill('SIGKILL');
      await new Promise((r) => qemu.once('exit', r));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

interface QemuMemory {
  rss: number;
  pss: number;
  privateDirty: number;
  pssShmem: number;
  /** MiB allocated in the machine's own shared RAM file (0 when it maps a snapshot privately). */
  ownFile: number;
  /**
   * What the machine costs the host, MiB: its PSS, with its own RAM file counted whole (mapped
   * or not) instead of the part of it QEMU has touched since it started.
   */
  total: number;
}

function memoryOf(pid: number): QemuMemory {
  const t = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kb = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(t)?.[1] ?? 0) / 1024;
  const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  const shared = /mem-path=([^,\0]+),share=on/.exec(argv)?.[1];
  const ownFile = shared ? statSync(shared).blocks / 2048 : 0;
  const m = { rss: kb('Rss'), pss: kb('Pss'), privateDirty: kb('Private_Dirty'), pssShmem: kb('Pss_Shmem') };
  return { ...m, ownFile, total: shared ? m.pss - m.pssShmem + ownFile : m.pss };
}

/** The daemon's 'machine branched' log lines since `from`: where each branch's time went. */
function branchSplits(log: string): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  for (const l of log.split('\n')) {
    if (!l.includes('"machine branched"')) continue;
    for (const [k, v] of Object.entries(JSON.parse(l) as Record<string, unknown>))
      if (typeof v === 'number') {
        const list = out[k] ?? [];
        list.push(v);
        out[k] = list;
      }
  }
  return out;
}

async function main(): Promise<void> {
  const manifest = await new TemplateBuilder(imageDir).build('python');
  const d = await startDaemon({
    env: { HUTCH_POOL_SIZE: '0', HUTCH_MAX_MACHINES: '40', HUTCH_ACCEL: 'tcg' },
  });
  try {
    await waitFor(
      'snapshot',
      async () =>
        ((await api(d.url, 'GET', '/healthz')).body as { snapshots: Record<string, string> }).snapshots
          .python === 'ready' || undefined,
      180_000,
    );
    const snapDir = (await import('node:fs'))
      .readdirSync(join(imageDir, 'snapshots'))
      .filter((f) => f.startsWith('python-') && !f.includes('.tmp'));
    const metas = snapDir.map(
      (f) =>
        JSON.parse(readFileSync(join(imageDir, 'snapshots', f, 'meta.json'), 'utf8')) as {
          mem: string;
          state: string;
          disk: string;
          cmdline: string;
          createdAt: string;
          accel: string;
        },
    );
    const snap = metas
      .filter((m) => m.accel === 'tcg')
      .sort((a, b) => b.createdAt.localeCompare(a.createdAt))[0];
    if (!snap) throw new Error('no tcg snapshot');

    const cold: number[] = [];
    const restore: number[] = [];
    const bare: number[] = [];
    for (let i = 0; i < runs; i++) {
      bare.push(await bareRestore(snap, manifest.kernel, `${snap.cmdline} hutch.hostname=bench`));
      let t0 = performance.now();
      let m = await create(d, { mode: 'snapshot' });
      await exec(d, String(m.id));
      restore.push(performance.now() - t0);
      await api(d.url, 'DELETE', `/v1/machines/${m.id}`);
      if (i < Math.min(runs, 10)) {
        t0 = performance.now();
        m = await create(d, { mode: 'cold' });
        await exec(d, String(m.id));
        cold.push(performance.now() - t0);
        await api(d.url, 'DELETE', `/v1/machines/${m.id}`);
      }
    }
    coldMedian = median(cold);
    line('cold create → first exec (baseline)', cold);
    line('snapshot create → first exec', restore);
    line('bare qemu restore → first exec', bare);
    console.log(
      `${'snapshot create / bare restore'.padEnd(40)} ${(median(restore) / median(bare)).toFixed(2)}x`,
    );

    // Branch and lifecycle on one source machine.
    const src = String((await create(d, {})).id);
    await exec(d, src);
    const branch: number[] = [];
    const pauseMs: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      const b = await api(d.url, 'POST', `/v1/machines/${src}/branch`, {});
      if (b.status !== 201) throw new Error(JSON.stringify(b.body));
      await exec(d, String(b.body.id));
      branch.push(performance.now() - t0);
      pauseMs.push(Number(b.body.pause_ms));
      await api(d.url, 'DELETE', `/v1/machines/${b.body.id}`);
    }
    line("branch → clone's first exec", branch);
    line('  of which the source was stopped', pauseMs);
    // Split from the daemon's log (absent on daemons older than the per-machine RAM files).
    for (const [k, xs] of Object.entries(branchSplits(d.log())))
      if (k.endsWith('_ms')) line(`  branch split: ${k}`, xs);
      else console.log(`${`  branch split: ${k}`.padEnd(40)} median=${median(xs).toFixed(1)}`);

    const resumeApi: number[] = [];
    const resumeQemu: number[] = [];
    for (let i = 0; i < runs; i++) {
      await api(d.url, 'POST', `/v1/machines/${src}/pause`);
      const t0 = performance.now();
      const r = await api(d.url, 'POST', `/v1/machines/${src}/resume`);
      resumeApi.push(performance.now() - t0);
      resumeQemu.push(Number(r.body.resume_us) / 1000);
    }
    line('pause → resume (API round trip)', resumeApi);
    line('  of which QEMU cont', resumeQemu);

    const suspendMs: number[] = [];
    const resumeDisk: number[] = [];
    for (let i = 0; i < runs; i++) {
      let t0 = performance.now();
      await api(d.url, 'POST', `/v1/machines/${src}/suspend`);
      suspendMs.push(performance.now() - t0);
      t0 = performance.now();
      await api(d.url, 'POST', `/v1/machines/${src}/resume`);
      await exec(d, src);
      resumeDisk.push(performance.now() - t0);
    }
    line('suspend (API)', suspendMs);
    line('resume from disk → first exec', resumeDisk);

    // Memory: idle restored machines (several, so what they share is split between them) vs an
    // idle cold-booted one.
    const clones: string[] = [];
    for (let i = 0; i < 4; i++) clones.push(String((await create(d, { mode: 'snapshot' })).id));
    const booted = String((await create(d, { mode: 'cold' })).id);
    for (const id of clones) await exec(d, id);
    await exec(d, booted);
    await new Promise((r) => setTimeout(r, 2000));
    const pidOf = (id: string): number => {
      for (const pid of qemusOf(d.stateDir))
        if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`hutch-${id},`)) return pid;
      throw new Error(`no qemu for ${id}`);
    };
    const show = (name: string, m: QemuMemory): void =>
      console.log(
        `${name.padEnd(40)} host=${m.total.toFixed(0)} rss=${m.rss.toFixed(0)} pss=${m.pss.toFixed(0)} private_dirty=${m.privateDirty.toFixed(0)} own_ram_file=${m.ownFile.toFixed(0)}`,
      );
    const mr = clones.map((id) => memoryOf(pidOf(id)));
    const mean = (f: (m: QemuMemory) => number): number => mr.reduce((a, m) => a + f(m), 0) / mr.length;
    show('memory per idle restored clone (MiB, 4)', {
      rss: mean((m) => m.rss),
      pss: mean((m) => m.pss),
      privateDirty: mean((m) => m.privateDirty),
      pssShmem: mean((m) => m.pssShmem),
      ownFile: mean((m) => m.ownFile),
      total: mean((m) => m.total),
    });
    show('memory cold-booted (MiB)', memoryOf(pidOf(booted)));
    for (const id of [src, ...clones, booted]) await api(d.url, 'DELETE', `/v1/machines/${id}`);

    // 20 concurrent creates.
    const t0 = performance.now();
    const each: number[] = [];
    const made = await Promise.all(
      Array.from({ length: 20 }, async () => {
        const s = performance.now();
        const m = await create(d, {});
        await exec(d, String(m.id));
        each.push(performance.now() - s);
        return String(m.id);
      }),
    );
    const total = performance.now() - t0;
    console.log(
      `${'20 concurrent creates → first exec'.padEnd(40)} total=${total.toFixed(0)}ms p99=${quantile(each, 0.99).toFixed(0)}ms median=${median(each).toFixed(0)}ms`,
    );
    for (const id of made) await api(d.url, 'DELETE', `/v1/machines/${id}`);
  } finally {
    await cleanup(d);
  }

  // Pooled creates: a daemon with a pool, waiting for it to refill between runs.
  const p = await startDaemon({ env: { HUTCH_POOL_SIZE: '2', HUTCH_ACCEL: 'tcg' } });
  try {
    const pooled: number[] = [];
    const server: number[] = [];
    for (let i = 0; i < runs; i++) {
      await waitFor(
        'pool',
        async () =>
          ((await api(p.url, 'GET', '/healthz')).body as { pool: Record<string, { ready: number }> }).pool
            .python?.ready === 2 || undefined,
        120_000,
      );
      const t0 = performance.now();
      const m = await create(p, {});
      if (m.mode !== 'pool') throw new Error(`expected a pooled machine, got ${String(m.mode)}`);
      await exec(p, String(m.id));
      pooled.push(performance.now() - t0);
      server.push(Number(m.boot_ms));
      await api(p.url, 'DELETE', `/v1/machines/${m.id}`);
    }
    line('pooled create → first exec', pooled);
    line('  of which create (server boot_ms)', server);
  } finally {
    await cleanup(p);
  }

  // HUTCH_CLONE_MEMORY=map: clones map the snapshot's memory copy-on-write (no RAM file of their
  // own): idle memory and branch time of the other side of the trade-off, in the same run.
  const mapped = await startDaemon({
    env: { HUTCH_POOL_SIZE: '0', HUTCH_ACCEL: 'tcg', HUTCH_CLONE_MEMORY: 'map' },
  });
  try {
    await waitFor(
      'snapshot',
      async () =>
        ((await api(mapped.url, 'GET', '/healthz')).body as { snapshots: Record<string, string> }).snapshots
          .python === 'ready' || undefined,
      600_000,
    );
    const clones: string[] = [];
    for (let i = 0; i < 4; i++) clones.push(String((await create(mapped, { mode: 'snapshot' })).id));
    for (const id of clones) await exec(mapped, id);
    await new Promise((r) => setTimeout(r, 2000));
    const mr = clones.map((id) => {
      for (const pid of qemusOf(mapped.stateDir))
        if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`hutch-${id},`)) return memoryOf(pid);
      throw new Error(`no qemu for ${id}`);
    });
    const mean = (f: (m: QemuMemory) => number): number => mr.reduce((a, m) => a + f(m), 0) / mr.length;
    console.log(
      `${'map: memory per idle restored clone (MiB, 4)'.padEnd(40)} host=${mean((m) => m.total).toFixed(0)} rss=${mean((m) => m.rss).toFixed(0)} pss=${mean((m) => m.pss).toFixed(0)} private_dirty=${mean((m) => m.privateDirty).toFixed(0)} own_ram_file=${mean((m) => m.ownFile).toFixed(0)}`,
    );
    const branch: number[] = [];
    const pauseMs: number[] = [];
    for (let i = 0; i < Math.min(runs, 5); i++) {
      const t0 = performance.now();
      const b = await api(mapped.url, 'POST', `/v1/machines/${clones[0]}/branch`, {});
      if (b.status !== 201) throw new Error(JSON.stringify(b.body));
      await exec(mapped, String(b.body.id));
      branch.push(performance.now() - t0);
      pauseMs.push(Number(b.body.pause_ms));
      await api(mapped.url, 'DELETE', `/v1/machines/${b.body.id}`);
    }
    line("map: branch → clone's first exec", branch);
    line('map:   of which the source was stopped', pauseMs);
  } finally {
    await cleanup(mapped);
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
