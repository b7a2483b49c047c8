/**
 * The caps cap QEMUs: a burst of parallel creates (machines and boxes) against a daemon with a
 * warm pool never runs more QEMU processes than HUTCH_MAX_MACHINES, admits exactly what fits
 * (the pool gives its machines up for users' creates, even those it cannot serve), and refuses
 * the rest with 429.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { ApiError } from '../../src/client/http-client.js';
import { api, cleanup, qemusOf, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';
import { Tally } from '../helpers/hostile.js';

const cap = 4;
const pool = 2;

/**
 * Samples the QEMU processes of a state dir until stopped; returns the most seen at once and
 * which machines they were (so a failure names the extra one).
 */
function sampleQemus(stateDir: string): { stop: () => { most: number; seen: string } } {
  let most = 0;
  let seen = '';
  const sample = (): void => {
    const pids = qemusOf(stateDir);
    if (pids.length <= most) return;
    most = pids.length;
    seen = pids.map(machineOf).join(', ');
  };
  const timer = setInterval(sample, 20);
  return {
    stop: () => {
      clearInterval(timer);
      sample();
      return { most, seen };
    },
  };
}

/** The machine id in a QEMU's -name (guest=hutch-<id>,…). */
function machineOf(pid: number): string {
  try {
    const arg = readFileSync(`/proc/${pid}/cmdline`, 'utf8')
      .split('\0')
      .find((a) => a.startsWith('guest=hutch-'));
    return arg?.slice('guest=hutch-'.length).split(',')[0] ?? String(pid);
  } catch {
    return `${pid} (gone)`;
  }
}

describe('hostile: parallel creates against the cap', () => {
  const tally = new Tally('caps');
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon({ env: { HUTCH_MAX_MACHINES: String(cap), HUTCH_POOL_SIZE: String(pool) } });
    await waitFor(
      'the warm pool',
      async () => {
        const h = (await api(d.url, 'GET', '/healthz')).body as { pool: Record<string, { ready: number }> };
        return h.pool.python?.ready === pool ? true : undefined;
      },
      180_000,
    );
  });
  after(async () => cleanup(d));

  test(`${cap * 3} machine creates at once (cold), ${pool} pooled: at most ${cap} QEMUs, ${cap} admitted`, async () => {
    assert.equal(qemusOf(d.stateDir).length, pool, 'the pool runs its machines');
    const sampler = sampleQemus(d.stateDir);
    // Cold boots, which the pool cannot serve: its machines must make room for them.
    const results = await Promise.all(
      Array.from({ length: cap * 3 }, () =>
        api(d.url, 'POST', '/v1/machines', { ttl_seconds: 120, mode: 'cold' }),
      ),
    );
    // Let a refill (which must not happen: the cap is reached) have its chance.
    await new Promise((r) => setTimeout(r, 3000));
    const { most, seen } = sampler.stop();
    const admitted = results.filter((r) => r.status === 201);
    const refused = results.filter((r) => r.status === 429 && r.body.code === 'RESOURCE_EXHAUSTED');
    tally.record('never more QEMUs than the cap', most <= cap, `at most ${most} QEMUs at once: ${seen}`);
    tally.record(`exactly ${cap} admitted`, admitted.length === cap, `${admitted.length} admitted`);
    tally.record(
      'the rest refused with 429 RESOURCE_EXHAUSTED',
      refused.length === results.length - cap,
      results.map((r) => r.status).join(','),
    );
    const h = (await api(d.url, 'GET', '/healthz')).body as { pool: Record<string, { ready: number }> };
    tally.record('the pool stays empty while users hold the cap', h.pool.python?.ready === 0);
    console.log(`machines: ${results.length} creates, ${admitted.length} admitted, at most ${most} QEMUs`);
  });

  test('boxes share the cap', async () => {
    const boxes = new BoxesClient({ socketPath: d.boxesSocket });
    // One slot back: a machine goes, then three boxes race for it.
    const first = ((await api(d.url, 'GET', '/v1/machines')).body.machines as { id: string }[])[0];
    assert.ok(first);
    await api(d.url, 'DELETE', `/v1/machines/${first.id}`);
    const sampler = sampleQemus(d.stateDir);
    const results = await Promise.all(
      Array.from({ length: 3 }, () =>
        boxes.create({ image: 'debian:bookworm' }).then(
          () => 'created',
          (e: unknown) => (e instanceof ApiError ? e.code : String(e)),
        ),
      ),
    );
    const { most, seen } = sampler.stop();
    tally.record('never more QEMUs than the cap (boxes)', most <= cap, `at most ${most}: ${seen}`);
    tally.record(
      'one box admitted, two refused',
      results.filter((r) => r === 'created').length === 1 &&
        results.filter((r) => r === 'RESOURCE_EXHAUSTED').length === 2,
      results.join(','),
    );
    tally.report();
  });
});
