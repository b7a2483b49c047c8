/**
 * gRPC API benchmark against the real daemon: each figure is the median (and p99, or a rate)
 * over N runs, with its baseline measured in the same process against the same box, as the
 * same user, over the boxes REST API on TCP (bearer token on both):
 *   - GetVm vs GET /v1/boxes/{id}: latency one at a time, and throughput with 16 in flight;
 *   - Exec `true` (bidi stream to the exit code) vs REST box exec (POST exec + its SSE events);
 *   - CreateVmFromTemplate → first Exec vs REST box create → first exec, and vs the machines
 *     API's snapshot create → first exec.
 *
 *   npm run bench:grpc [-- --runs 30]
 */
import { parseArgs } from 'node:util';
import { cleanup, startDaemon } from '../test/helpers/daemon.js';
import { boxdClient, type Msg, tokenFor } from '../test/helpers/grpc.js';
import { grpcExec } from '../test/helpers/grpc-exec.js';
import { median, quantile } from './bench-lib.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '30' } } });
const runs = Number(values.runs);
const MiB = 1024 * 1024;

function line(name: string, xs: number[], base?: number[]): void {
  const ratio = base ? ` (${(median(xs) / median(base)).toFixed(2)}× the REST baseline)` : '';
  console.log(
    `${name.padEnd(48)} median=${median(xs).toFixed(2)}ms p99=${quantile(xs, 0.99).toFixed(2)}ms n=${xs.length}${ratio}`,
  );
}

async function timed(n: number, warmup: number, f: () => Promise<unknown>): Promise<number[]> {
  const xs: number[] = [];
  for (let i = 0; i < n + warmup; i++) {
    const t = performance.now();
    await f();
    if (i >= warmup) xs.push(performance.now() - t);
  }
  return xs;
}

/** Calls per second with `parallel` in flight for `ms`. */
async function rate(parallel: number, ms: number, f: () => Promise<unknown>): Promise<number> {
  let done = 0;
  const until = performance.now() + ms;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (performance.now() < until) {
        await f();
        done++;
      }
    }),
  );
  return (done * 1000) / ms;
}

const d = await startDaemon({ env: { HUTCH_BOXES_LISTEN: '127.0.0.1:0' } });
try {
  const token = await tokenFor(d, 'bench');
  const rest = d.boxesUrl as string;
  const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
  const get = async (path: string): Promise<Msg> => {
    const r = await fetch(new URL(path, rest), { headers });
    if (r.status !== 200) throw new Error(`GET ${path}: ${r.status} ${await r.text()}`);
    return (await r.json()) as Msg;
  };
  const restExec = async (box: string): Promise<void> => {
    const r = await fetch(new URL(`/v1/boxes/${box}/exec`, rest), {
      method: 'POST',
      headers,
      body: JSON.stringify({ cmd: ['true'] }),
    });
    const e = (await r.json()) as { id: string };
    const ev = await fetch(new URL(`/v1/boxes/${box}/exec/${e.id}/events`, rest), { headers });
    const text = await ev.text();
    if (!text.includes('event: exit')) throw new Error(`no exit event: ${text.slice(0, 200)}`);
  };
  const c = boxdClient(d.grpcAddress as string, token);
  const vm = await c.call<Msg>('CreateVm', {
    name: 'b1',
    config: { vcpu: 1, memory_bytes: String(256 * MiB) },
  });
  const id = vm.vm_id as string;

  const restGet = await timed(runs * 10, 20, () => get(`/v1/boxes/${id}`));
  const grpcGet = await timed(runs * 10, 20, () => c.call('GetVm', { vm_id: id }));
  line('baseline: REST GET /v1/boxes/{id}', restGet);
  line('gRPC GetVm', grpcGet, restGet);
  const restRate = await rate(16, 3000, () => get(`/v1/boxes/${id}`));
  const grpcRate = await rate(16, 3000, () => c.call('GetVm', { vm_id: id }));
  console.log(`${'baseline: REST GET /v1/boxes/{id}, 16 in flight'.padEnd(48)} ${restRate.toFixed(0)}/s`);
  console.log(
    `${'gRPC GetVm, 16 in flight'.padEnd(48)} ${grpcRate.toFixed(0)}/s (${(grpcRate / restRate).toFixed(2)}× the REST baseline)`,
  );

  const restEx = await timed(runs, 3, () => restExec(id));
  const grpcEx = await timed(runs, 3, () => grpcExec(c, id, 'true').done);
  line('baseline: REST box exec `true` (POST + events)', restEx);
  line('gRPC Exec `true` (to the exit code)', grpcEx, restEx);

  // Create → first exec: the machines API's snapshot create (a template clone, the issue's
  // baseline) and the boxes API's create, against gRPC CreateVmFromTemplate.
  const snapCreate: number[] = [];
  for (let i = 0; i < Math.min(runs, 7); i++) {
    const t = performance.now();
    const r = await fetch(new URL('/v1/machines', d.url), {
      method: 'POST',
      headers,
      body: JSON.stringify({ template: 'python', mode: 'snapshot', ttl_seconds: 120 }),
    });
    const m = (await r.json()) as { id: string };
    const x = await fetch(new URL(`/v1/machines/${m.id}/exec`, d.url), {
      method: 'POST',
      headers,
      body: JSON.stringify({ cmd: ['true'] }),
    });
    if (((await x.json()) as { exit_code: number }).exit_code !== 0) throw new Error('machine exec failed');
    snapCreate.push(performance.now() - t);
    await fetch(new URL(`/v1/machines/${m.id}`, d.url), { method: 'DELETE', headers });
  }
  line('baseline: REST machine snapshot create → exec', snapCreate);
  const restCreate: number[] = [];
  for (let i = 0; i < Math.min(runs, 7); i++) {
    const t = performance.now();
    const r = await fetch(new URL('/v1/boxes', rest), {
      method: 'POST',
      headers,
      body: JSON.stringify({ image: 'debian:bookworm', cpu: 1, memory_mb: 256 }),
    });
    const b = (await r.json()) as { id: string };
    await restExec(b.id);
    restCreate.push(performance.now() - t);
    await fetch(new URL(`/v1/boxes/${b.id}?force=true`, rest), { method: 'DELETE', headers });
  }
  line('baseline: REST box create → first exec', restCreate);
  const tpl = await c
    .call<Msg>('CreateTemplate', {
      name: 'bench-tpl',
      image_ref: 'debian:bookworm',
      config: { vcpu: 1, memory_bytes: String(256 * MiB) },
    })
    .catch((e: Error) => e);
  if (tpl instanceof Error)
    console.log(`${'gRPC CreateVmFromTemplate → first Exec'.padEnd(48)} not measured: ${tpl.message}`);
  else {
    const fromTpl: number[] = [];
    for (let i = 0; i < Math.min(runs, 7); i++) {
      const t = performance.now();
      const v = await c.call<Msg>('CreateVmFromTemplate', { template_id: tpl.template_id, name: `t${i}` });
      await grpcExec(c, v.vm_id as string, 'true').done;
      fromTpl.push(performance.now() - t);
      await c.call('DestroyVm', { vm_id: v.vm_id });
    }
    line('gRPC CreateVmFromTemplate → first Exec', fromTpl, restCreate);
    console.log(
      `${'  … against the machine snapshot create'.padEnd(48)} ${(median(fromTpl) / median(snapCreate)).toFixed(2)}×`,
    );
    await c.call('DeleteTemplate', { template_id: tpl.template_id });
  }
  await c.call('DestroyVm', { vm_id: id });
  c.close();
} finally {
  await cleanup(d);
}
