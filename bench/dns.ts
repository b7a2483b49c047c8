/**
 * Guest resolver benchmark (src/net/dns), on loopback in this process. Figures are medians over
 * N runs, each with a ratio against a baseline measured in this same process:
 *   - queries per second (UDP, 16 in flight) for an allowed name answered from the resolver's
 *     cache, and with the cache off (every query forwarded), against the fake upstream
 *     (test/helpers/fake-dns.ts) asked directly;
 *   - the same for a denied name (answered locally, NXDOMAIN);
 *   - one rule decision with a 1,000-rule allowlist against a 10-rule one (ns per lookup).
 *
 *   npm run bench:dns [-- --runs 5 --queries 4000]
 */
import { createSocket } from 'node:dgram';
import { parseArgs } from 'node:util';
import { buildQuery, CLASS_IN, DnsType } from '../src/net/dns/dns-wire.js';
import { compileDomainRules } from '../src/net/dns/domain-rules.js';
import { type ClientPolicy, DnsResolver } from '../src/net/dns/resolver.js';
import { startFakeDns } from '../test/helpers/fake-dns.js';
import { median } from './bench-lib.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '5' }, queries: { type: 'string', default: '4000' } },
});
const runs = Number(values.runs);
const queries = Number(values.queries);
const WINDOW = 16;

function line(name: string, value: number, unit: string, base?: number): void {
  // For rates, higher is better: the ratio is how many times the baseline's rate this is.
  const ratio = base ? ` ratio=${(value / base).toFixed(2)}x` : '';
  console.log(`${name.padEnd(52)} median=${value.toFixed(unit === '/s' ? 0 : 1)}${unit}${ratio}`);
}

/** Queries per second for `name` against port, WINDOW queries in flight on one socket. */
async function qps(port: number, name: string): Promise<number> {
  const s = createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', () => r()));
  const msgs = Array.from({ length: 65536 }, (_, id) =>
    id < WINDOW * 2 ? buildQuery(id, { name, type: DnsType.A, class: CLASS_IN }) : Buffer.alloc(0),
  );
  let sent = 0;
  let got = 0;
  const t = performance.now();
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name}: ${got}/${queries} answers`)), 60_000);
    const send = (): void => {
      s.send(msgs[sent % (WINDOW * 2)]!, port, '127.0.0.1');
      sent++;
    };
    s.on('message', () => {
      got++;
      if (got === queries) {
        clearTimeout(timer);
        resolve();
      } else if (sent < queries) send();
    });
    for (let i = 0; i < WINDOW; i++) send();
  });
  const elapsed = performance.now() - t;
  s.close();
  return (queries / elapsed) * 1000;
}

async function medianOf(f: () => Promise<number>): Promise<number> {
  await f();
  const xs: number[] = [];
  for (let i = 0; i < runs; i++) xs.push(await f());
  return median(xs);
}

const fake = await startFakeDns({ records: { 'allowed.bench': { a: ['93.184.216.34'], ttl: 3600 } } });
const policy: ClientPolicy = {
  id: 'bench',
  allow: compileDomainRules(['allowed.bench']),
  deny: compileDomainRules([]),
  onAnswer: () => {},
  onDenied: () => {},
};
const options = {
  host: '127.0.0.1',
  port: 0,
  upstreams: [{ host: '127.0.0.1', port: fake.port }],
  policyFor: (a: string) => (a === '127.0.0.1' ? policy : undefined),
  rateLimit: { perSecond: 1e9, burst: 1e9 },
};
const cached = new DnsResolver(options);
const uncached = new DnsResolver({ ...options, cacheEntries: 0 });
try {
  const c = await cached.start();
  const u = await uncached.start();
  const base = await medianOf(() => qps(fake.port, 'allowed.bench'));
  line('baseline: fake upstream asked directly', base, '/s');
  line(
    'resolver, allowed name, from its cache',
    await medianOf(() => qps(c.port, 'allowed.bench')),
    '/s',
    base,
  );
  line(
    'resolver, allowed name, no cache (forwarded)',
    await medianOf(() => qps(u.port, 'allowed.bench')),
    '/s',
    base,
  );
  line(
    'resolver, denied name (NXDOMAIN, local)',
    await medianOf(() => qps(c.port, 'denied.bench')),
    '/s',
    base,
  );

  const names = Array.from({ length: 10_000 }, (_, i) => `a.b.host${i}.example${i % 7}.net`);
  const decision = (n: number): (() => Promise<number>) => {
    const rules = compileDomainRules(
      Array.from({ length: n }, (_, i) => (i % 2 ? `*.site${i}.example.com` : `site${i}.example.org`)),
    );
    return async () => {
      const t = process.hrtime.bigint();
      let hits = 0;
      for (let k = 0; k < 20; k++) for (const name of names) if (rules.matches(name)) hits++;
      const ns = Number(process.hrtime.bigint() - t) / (20 * names.length);
      if (hits > 0) throw new Error('no name should match');
      return ns;
    };
  };
  const ten = await medianOf(decision(10));
  line('baseline: rule decision, 10 rules', ten, 'ns');
  line('rule decision, 1,000 rules', await medianOf(decision(1000)), 'ns', ten);
} finally {
  await cached.close();
  await uncached.close();
  await fake.close();
}
