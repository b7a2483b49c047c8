/**
 * Boot benchmark: cold create → first exec answered, through the real daemon, against a bare
 * QEMU boot of the same kernel and root filesystem started by this script (spawn → agent answers
 * PING → `true` ran), so the ratio is the daemon's own overhead. Prints one figure per line: median and p90 over N runs, and the ratio daemon/bare.
 *
 *   npm run bench:boot [-- --runs 10]
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { connectAgent } from '../src/guest/agent-connection.js';
import { TemplateBuilder } from '../src/images/builder.js';
import { createOverlay } from '../src/vmm/disk.js';
import { tcgTimingArgs } from '../src/vmm/host.js';
import { api, cleanup, imageDir, startDaemon } from '../test/helpers/daemon.js';
import { bareQemuArgs, median, quantile } from './bench-lib.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '10' } } });
const runs = Number(values.runs);

const line = (name: string, xs: number[]): void =>
  console.log(
    `${name.padEnd(34)} median=${median(xs).toFixed(0)}ms p90=${quantile(xs, 0.9).toFixed(0)}ms n=${xs.length}`,
  );

async function bareBoot(
  kernel: string,
  rootfs: string,
  cmdline: string,
): Promise<{ ready: number; firstExec: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-bench-'));
  try {
    await createOverlay(rootfs, join(dir, 'disk.qcow2'), 'raw');
    const sock = join(dir, 'agent.sock');
    const t0 = performance.now();
    const qemu = spawn(
      'qemu-system-x86_64',
      bareQemuArgs({ kernel, cmdline, disk: join(dir, 'disk.qcow2'), agentSock: sock }),
      { stdio: 'ignore' },
    );
    try {
      const conn = await connectAgent(sock, { timeoutMs: 60_000 });
      const ready = performance.now() - t0;
      const r = await conn.execCollect({ argv: ['true'] }, { maxOutputBytes: 1024 });
      if (r.exitCode !== 0) throw new Error('bare exec of true failed');
      const ms = performance.now() - t0;
      conn.close();
      return { ready, firstExec: ms };
    } finally {
      qemu.kill('SIGKILL');
      await new Promise((r) => qemu.once('exit', r));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const manifest = await new TemplateBuilder(imageDir).build('python');
  const cmdline = `${manifest.cmdline} hutch.hostname=bench ${tcgTimingArgs(manifest.kernelHz)}`;
  const d = await startDaemon({ env: { HUTCH_ACCEL: 'tcg' } });
  const daemonMs: number[] = [];
  const bootMs: number[] = [];
  const execMs: number[] = [];
  const bareMs: number[] = [];
  const bareReadyMs: number[] = [];
  try {
    // Interleave the two so that drift in host load hits both alike.
    for (let i = 0; i < runs; i++) {
      const bare = await bareBoot(manifest.kernel, manifest.rootfs, cmdline);
      bareMs.push(bare.firstExec);
      bareReadyMs.push(bare.ready);
      const t0 = performance.now();
      const m = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 120, mode: 'cold' });
      if (m.status !== 201) throw new Error(JSON.stringify(m.body));
      const t1 = performance.now();
      const e = await api(d.url, 'POST', `/v1/machines/${m.body.id}/exec`, { cmd: ['true'] });
      if (e.body.exit_code !== 0) throw new Error(JSON.stringify(e.body));
      const t2 = performance.now();
      daemonMs.push(t2 - t0);
      bootMs.push(Number(m.body.boot_ms));
      execMs.push(t2 - t1);
      await api(d.url, 'DELETE', `/v1/machines/${m.body.id}`);
    }
  } finally {
    await cleanup(d);
  }
  line('cold create → first exec', daemonMs);
  line('  of which boot_ms (server)', bootMs);
  line('  of which first exec round trip', execMs);
  line('bare qemu spawn → first exec', bareMs);
  line('  of which spawn → agent answers', bareReadyMs);
  console.log(
    `${'ratio daemon / bare (medians)'.padEnd(34)} ${(median(daemonMs) / median(bareMs)).toFixed(2)}x`,
  );
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
