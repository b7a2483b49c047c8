/**
 * Accounts benchmark, against the real daemon (REST on loopback). Figures are medians over N
 * runs, each with a ratio against a baseline measured in this same process:
 *   - key → JWT exchange latency and exchanges per second (sequential and 8 in flight), against
 *     GET /healthz (a public route: the HTTP round trip with no auth work);
 *   - a machine's GET with a bearer token (JWT verify + jti and user lookups) against the same
 *     GET token-less as the loopback admin: what authentication costs each request.
 *
 *   npm run bench:auth [-- --runs 300]
 */
import { parseArgs } from 'node:util';
import { exchange, userWithToken } from '../test/helpers/accounts.js';
import { cleanup, startDaemon } from '../test/helpers/daemon.js';
import { latencyLine, median, timedRuns } from './bench-lib.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '300' } } });
const runs = Number(values.runs);

const line = (name: string, xs: number[], base?: number[]): void => latencyLine(name, xs, base, 44);
const timed = (n: number, f: () => Promise<unknown>): Promise<number[]> => timedRuns(n, f, 10);

async function get(url: string, headers: Record<string, string> = {}): Promise<void> {
  const r = await fetch(url, { headers });
  await r.arrayBuffer();
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
}

const d = await startDaemon({ env: { HUTCH_TOKEN_EXCHANGES_PER_MINUTE: '100000000' } });
try {
  const u = await userWithToken(d, 'bench');
  const auth = { authorization: `Bearer ${u.token}` };
  const created = await fetch(new URL('/v1/machines', d.url), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ template: 'python', ttl_seconds: 600 }),
  });
  const admin = (await created.json()) as { id: string };
  const mine = await fetch(new URL('/v1/machines', d.url), {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...auth },
    body: JSON.stringify({ template: 'python', ttl_seconds: 600 }),
  });
  const own = (await mine.json()) as { id: string };

  const health = await timed(runs, () => get(`${d.url}/healthz`));
  line('baseline: GET /healthz (no auth work)', health);
  const ex = await timed(runs, async () => {
    const r = await exchange(d, u.apiKey);
    if (r.status !== 200) throw new Error(JSON.stringify(r.body));
  });
  line('POST /api/v1/auth/token (key → JWT)', ex, health);
  console.log(`${'exchanges per second, 1 in flight'.padEnd(44)} ${(1000 / median(ex)).toFixed(0)}/s`);
  const t0 = performance.now();
  let done = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (done < runs * 2) {
        done++;
        await exchange(d, u.apiKey);
      }
    }),
  );
  console.log(
    `${'exchanges per second, 8 in flight'.padEnd(44)} ${((done / (performance.now() - t0)) * 1000).toFixed(0)}/s`,
  );
  const anon = await timed(runs, () => get(`${d.url}/v1/machines/${admin.id}`));
  line('baseline: GET /v1/machines/{id}, no token', anon);
  const bearer = await timed(runs, () => get(`${d.url}/v1/machines/${own.id}`, auth));
  line('GET /v1/machines/{id} with a bearer token', bearer, anon);
} finally {
  await cleanup(d);
}
