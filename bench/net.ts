/**
 * Guest networking benchmark against the real daemon and the tests' fake internet (a network
 * namespace on this host). Each figure is a median over N runs; its baseline is measured in the
 * same process:
 *   - networked snapshot create → first exec, vs the non-networked one;
 *   - a preview request (GET /v1/machines/{id}/web/8000/, through the agent), one at a time and
 *     16 in flight, vs the same requests sent straight to the guest's address from inside its
 *     namespace (a direct connection over the tap);
 *   - guest → "internet" HTTP download of 32 MiB, uncapped, and under the default 100 Mbit/s cap;
 *   - time for a refused connection to fail under a 1,000-rule CIDR allowlist vs no rules.
 * DNS resolver throughput and the domain-rule decision time are bench/dns.ts's.
 *
 *   npm run bench:net [-- --runs 7]
 */
import { execFileSync } from 'node:child_process';
import { parseArgs } from 'node:util';
import { daemonTag } from '../src/net/addressing.js';
import { api, cleanup, startDaemon, type TestDaemon } from '../test/helpers/daemon.js';
import { startFakeInternet } from '../test/helpers/fake-internet.js';
import { startGuestWebServer } from '../test/helpers/guest-web-server.js';
import { median } from './bench-lib.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '7' } } });
const runs = Number(values.runs);

function line(name: string, value: number, unit: string, base?: number, baseName = 'baseline'): void {
  const ratio = base ? ` (${(value / base).toFixed(2)}× ${baseName})` : '';
  console.log(`${name.padEnd(56)} ${value.toFixed(unit === 'ms' ? 1 : 2)} ${unit}${ratio}`);
}

async function exec(d: TestDaemon, id: string, cmd: string): Promise<string> {
  // One retry: fetch may reuse a keep-alive connection the server is closing at that moment.
  const call = () => api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 300_000 });
  const r = await call().catch(call);
  if (r.body.exit_code !== 0) throw new Error(`${cmd.slice(0, 80)}: ${JSON.stringify(r.body).slice(0, 400)}`);
  return String(r.body.stdout).trim();
}

async function createToExec(d: TestDaemon, net: boolean): Promise<{ ms: number; id: string }> {
  const t = performance.now();
  const r = await api(d.url, 'POST', '/v1/machines', {
    template: 'python',
    net,
    mode: 'snapshot',
    ttl_seconds: 900,
  });
  if (r.status !== 201) throw new Error(JSON.stringify(r.body));
  await exec(d, r.body.id as string, 'true');
  return { ms: performance.now() - t, id: r.body.id as string };
}

/** Latency (ms, one at a time) and rate (requests/s, 16 in flight) of GETs, measured by a node client. */
const clientScript = (url: string, n: number): string => `
const http = require('node:http');
const agent = new http.Agent({ keepAlive: false });
const get = () => new Promise((ok, ko) => http.get(${JSON.stringify(url)}, { agent }, (r) => { r.resume(); r.on('end', ok); }).on('error', ko));
(async () => {
  const xs = [];
  for (let i = 0; i < ${n} + 3; i++) { const t = performance.now(); await get(); if (i >= 3) xs.push(performance.now() - t); }
  xs.sort((a, b) => a - b);
  let done = 0; const until = performance.now() + 3000;
  await Promise.all(Array.from({ length: 16 }, async () => { while (performance.now() < until) { await get(); done++; } }));
  console.log(JSON.stringify({ ms: xs[Math.floor(xs.length / 2)], rate: done / 3 }));
})();`;

const inet = await startFakeInternet();
const d = await startDaemon({ env: { ...inet.env, HUTCH_NET_BYTES_PER_SECOND: '0' } });
const capped = await startDaemon({ env: inet.env });
try {
  // The networked snapshot is taken after the template's, in the background.
  for (const daemon of [d, capped])
    for (let i = 0; ; i++) {
      const r = await api(daemon.url, 'POST', '/v1/machines', {
        template: 'python',
        net: true,
        mode: 'snapshot',
        ttl_seconds: 60,
      });
      if (r.status === 201) {
        await api(daemon.url, 'DELETE', `/v1/machines/${r.body.id}`);
        break;
      }
      if (i > 300) throw new Error(`no networked snapshot: ${JSON.stringify(r.body)}`);
      await new Promise((res) => setTimeout(res, 1000));
    }

  const plain: number[] = [];
  const networked: number[] = [];
  for (let i = 0; i < runs; i++)
    for (const net of [false, true]) {
      const r = await createToExec(d, net);
      (net ? networked : plain).push(r.ms);
      await api(d.url, 'DELETE', `/v1/machines/${r.id}`);
    }
  line('snapshot create → first exec, no network', median(plain), 'ms');
  line('snapshot create → first exec, networked', median(networked), 'ms', median(plain), 'no network');

  const { id } = await createToExec(d, true);
  await exec(d, id, startGuestWebServer(8000).replace('("127.0.0.1"', '("0.0.0.0"'));
  const netns = `hutch-${daemonTag(d.stateDir)}-${id}`;
  const direct = JSON.parse(
    execFileSync(
      'ip',
      ['netns', 'exec', netns, 'node', '-e', clientScript('http://172.31.255.2:8000/', runs * 10)],
      {
        encoding: 'utf8',
      },
    ),
  ) as { ms: number; rate: number };
  const preview = JSON.parse(
    execFileSync(
      'node',
      ['-e', clientScript(new URL(`/v1/machines/${id}/web/8000/`, d.url).href, runs * 10)],
      {
        encoding: 'utf8',
      },
    ),
  ) as { ms: number; rate: number };
  line('preview GET, one at a time', preview.ms, 'ms', direct.ms, 'direct to the guest over its tap');
  line('direct GET to the guest (baseline), one at a time', direct.ms, 'ms');
  line('preview GET, 16 in flight', preview.rate, 'req/s', direct.rate, 'direct');
  line('direct GET to the guest (baseline), 16 in flight', direct.rate, 'req/s');

  const download = async (daemon: TestDaemon, machine: string): Promise<number> => {
    const xs: number[] = [];
    for (let i = 0; i < Math.min(runs, 5); i++) {
      const s = await exec(
        daemon,
        machine,
        `python3 -c "import time, urllib.request as u; t=time.time(); n=len(u.urlopen('http://files.test/big', timeout=120).read()); print(n / (time.time() - t) / 1e6)"`,
      );
      xs.push(Number(s));
    }
    return median(xs);
  };
  const uncapped = await download(d, id);
  const { id: cid } = await createToExec(capped, true);
  const cappedRate = await download(capped, cid);
  line('guest → internet download, uncapped', uncapped, 'MB/s');
  line('guest → internet download, 100 Mbit/s cap', cappedRate, 'MB/s', uncapped, 'uncapped');

  const refuse = `python3 - <<'EOF'
import socket, time
xs = []
for i in range(${runs * 5}):
    t = time.perf_counter()
    try: socket.create_connection(("198.18.1.11", 80), 3)
    except OSError: pass
    xs.append((time.perf_counter() - t) * 1000)
xs.sort(); print(xs[len(xs) // 2])
EOF`;
  await api(d.url, 'PUT', `/v1/machines/${id}/egress`, { deny: ['198.18.1.11'] });
  const few = Number(await exec(d, id, refuse));
  const many = Array.from({ length: 999 }, (_, i) => `203.0.${i >> 4}.${(i & 15) * 16}/28`);
  await api(d.url, 'PUT', `/v1/machines/${id}/egress`, { allow: [...many, 'pypi.test'] });
  const thousand = Number(await exec(d, id, refuse));
  line('refused connection fails after, 1 deny rule', few, 'ms');
  line('refused connection fails after, 1,000-rule allowlist', thousand, 'ms', few, '1 rule');
} finally {
  await cleanup(d).catch((e: unknown) => console.error(e));
  await cleanup(capped).catch((e: unknown) => console.error(e));
  await inet.close();
}
