/**
 * Boxes API benchmark, through the real daemon's Unix socket. Each figure is the median and p99
 * (or a rate) over N runs. Baselines measured in this same process:
 *   - exec: the same `true` sent straight to the agent of a bare QEMU of the same image (no
 *     daemon, no HTTP, no SSE): what the API costs on top of the agent;
 *   - files: `dd` reading the same file inside the guest (its page cache), i.e. what the guest
 *     itself can move, against what crosses the agent + HTTP;
 *   - run: create + exec + remove done as three calls by the client.
 *
 *   npm run bench:boxes [-- --runs 20]
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { BoxesClient, readAll } from '../src/client/boxes-client.js';
import { connectAgent } from '../src/guest/agent-connection.js';
import { TemplateBuilder } from '../src/images/builder.js';
import { ImageStore } from '../src/images/oci.js';
import { createOverlay } from '../src/vmm/disk.js';
import { tcgTimingArgs } from '../src/vmm/host.js';
import { cleanup, imageDir, startDaemon } from '../test/helpers/daemon.js';
import { bareQemuArgs, median, quantile } from './bench-lib.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '20' }, image: { type: 'string', default: 'debian:bookworm' } },
});
const runs = Number(values.runs);
const image = values.image as string;
const small = { cpu: 1, memory_mb: 256 };

function line(name: string, xs: number[], extra = ''): void {
  console.log(
    `${name.padEnd(44)} median=${median(xs).toFixed(1)}ms p99=${quantile(xs, 0.99).toFixed(1)}ms n=${xs.length}${extra}`,
  );
}

async function execWait(c: BoxesClient, box: string, cmd: string[]): Promise<string> {
  const e = await c.exec<{ id: string }>(box, { cmd });
  let out = '';
  for await (const ev of c.events(box, e.id)) if (ev.event === 'log') out += ev.data.data;
  return out;
}

/** `true` over the agent of a bare QEMU booted from the same kernel and disk. */
async function bareExecBaseline(kernel: string, rootfs: string, cmdline: string): Promise<number[]> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-bench-'));
  const disk = join(dir, 'disk.qcow2');
  await createOverlay(rootfs, disk, 'raw');
  const agentSock = join(dir, 'agent.sock');
  const q = spawn('qemu-system-x86_64', bareQemuArgs({ kernel, cmdline, disk, agentSock }), {
    stdio: 'ignore',
  });
  try {
    const agent = await connectAgent(agentSock, { timeoutMs: 60_000 });
    const xs: number[] = [];
    for (let i = 0; i < runs + 3; i++) {
      const t = performance.now();
      await agent.execCollect({ argv: ['true'] }, { maxOutputBytes: 1024 });
      if (i >= 3) xs.push(performance.now() - t);
    }
    agent.close();
    return xs;
  } finally {
    q.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Execs per second with `parallel` commands in flight at all times, for `ms`. */
async function rate(c: BoxesClient, boxes: string[], parallel: number, ms: number): Promise<number> {
  let done = 0;
  const until = performance.now() + ms;
  await Promise.all(
    Array.from({ length: parallel }, async (_, i) => {
      const box = boxes[i % boxes.length] as string;
      while (performance.now() < until) {
        await execWait(c, box, ['true']);
        done++;
      }
    }),
  );
  return done / (ms / 1000);
}

async function main(): Promise<void> {
  const d = await startDaemon();
  const c = new BoxesClient({ socketPath: d.boxesSocket });
  try {
    // Create → first exec answered: cold boots (a disk under the snapshot's 8 GiB never
    // restores) against restores from the image's snapshot (taken after the first create).
    const createExec = async (
      body: Record<string, unknown>,
    ): Promise<{ ms: number; id: string; mode: string }> => {
      const t = performance.now();
      const b = await c.create<{ id: string; mode: string }>({ image, ...small, ...body });
      await execWait(c, b.id, ['true']);
      return { ms: performance.now() - t, id: b.id, mode: b.mode };
    };
    const cold: number[] = [];
    const restored: number[] = [];
    for (let i = 0; i < Math.min(runs, 8); i++) {
      const r = await createExec({ disk_size_gb: 4 });
      cold.push(r.ms);
      await c.remove(r.id, true);
    }
    for (let i = 0; restored.length < Math.min(runs, 8) && i < 60; i++) {
      const r = await createExec({});
      if (r.mode === 'snapshot') restored.push(r.ms);
      await c.remove(r.id, true);
    }
    line('create → first exec, cold boot', cold);
    line(
      'create → first exec, from snapshot',
      restored,
      ` ratio_to_cold=${(median(restored) / median(cold)).toFixed(2)}`,
    );
    const box = await c.create<{ id: string }>({ image, ...small });
    for (let i = 0; i < 3; i++) await execWait(c, box.id, ['true']);
    const api: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t = performance.now();
      await execWait(c, box.id, ['true']);
      api.push(performance.now() - t);
    }
    const builder = new TemplateBuilder(imageDir);
    const manifest = await new ImageStore(imageDir, { insecureRegistries: [], builder }).resolve(image);
    const bare = await bareExecBaseline(
      manifest.kernel,
      manifest.rootfs,
      `${manifest.cmdline} hutch.hostname=bench ${tcgTimingArgs(manifest.kernelHz)}`,
    );
    line('baseline: bare agent exec `true`', bare);
    line(
      'exec `true`: POST exec + SSE to exit',
      api,
      ` ratio_to_bare=${(median(api) / median(bare)).toFixed(2)}`,
    );

    console.log(
      `execs/s, one box, 4 in flight                ${(await rate(c, [box.id], 4, 5000)).toFixed(1)}`,
    );
    const more = [box.id];
    for (let i = 0; i < 3; i++) more.push((await c.create<{ id: string }>({ image, ...small })).id);
    console.log(`execs/s, 4 boxes, 4 in flight (one each)     ${(await rate(c, more, 4, 5000)).toFixed(1)}`);
    for (const id of more.slice(1)) await c.remove(id, true);

    const size = 64 * 1024 * 1024;
    const blob = randomBytes(size);
    const ups: number[] = [];
    const downs: number[] = [];
    const cats: number[] = [];
    for (let i = 0; i < Math.min(runs, 5); i++) {
      let t = performance.now();
      await c.upload(box.id, '/root/blob', blob);
      ups.push(size / 1e6 / ((performance.now() - t) / 1000));
      t = performance.now();
      const back = await readAll(await c.download(box.id, '/root/blob'));
      downs.push(size / 1e6 / ((performance.now() - t) / 1000));
      if (back.length !== size) throw new Error('short download');
      const dd = await execWait(c, box.id, [
        'sh',
        '-c',
        'dd if=/root/blob of=/dev/null bs=1M 2>&1 | tail -1',
      ]);
      const m = /([\d.]+) s, ([\d.]+) ([MG])B\/s/.exec(dd);
      if (m) cats.push(Number(m[2]) * (m[3] === 'G' ? 1000 : 1));
    }
    const mbs = (name: string, xs: number[], extra = ''): void =>
      console.log(`${name.padEnd(44)} median=${median(xs).toFixed(1)}MB/s n=${xs.length}${extra}`);
    mbs('baseline: dd of the file inside the guest', cats);
    mbs(
      'upload 64 MiB (multipart → agent)',
      ups,
      ` ratio_to_guest_read=${(median(ups) / median(cats)).toFixed(2)}`,
    );
    mbs(
      'download 64 MiB (agent → HTTP)',
      downs,
      ` ratio_to_guest_read=${(median(downs) / median(cats)).toFixed(2)}`,
    );
    await c.remove(box.id, true);

    const runsE2e: number[] = [];
    const threeCalls: number[] = [];
    for (let i = 0; i < Math.min(runs, 8); i++) {
      let t = performance.now();
      const r = await c.run<{ stdout: string }>({ image, cmd: ['echo', 'hi'], ...small });
      if (r.stdout !== 'hi\n') throw new Error(JSON.stringify(r));
      runsE2e.push(performance.now() - t);
      t = performance.now();
      const b = await c.create<{ id: string }>({ image, ...small });
      await execWait(c, b.id, ['echo', 'hi']);
      await c.remove(b.id, true);
      threeCalls.push(performance.now() - t);
    }
    line('baseline: create + exec + remove (3 calls)', threeCalls);
    line(
      'POST /v1/run echo hi',
      runsE2e,
      ` ratio_to_3_calls=${(median(runsE2e) / median(threeCalls)).toFixed(2)}`,
    );
  } finally {
    await cleanup(d);
  }
}

await main();
