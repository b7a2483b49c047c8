import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, cleanup, qemusOf, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';

describe('daemon restart with a machine running', () => {
  let d: TestDaemon;
  after(async () => cleanup(d));

  for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
    test(`after ${signal} the new daemon adopts the machine, which keeps its files and answers exec`, async () => {
      d ??= await startDaemon();
      const m = (
        await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600, name: `keep-${signal.toLowerCase()}` })
      ).body;
      assert.equal(m.status, 'running');
      const w = await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, {
        cmd: 'echo precious > /root/note; sync',
      });
      assert.equal(w.body.exit_code, 0);
      const pidsBefore = qemusOf(d.stateDir);
      await d.stop(signal);
      d = await startDaemon({ stateDir: d.stateDir });
      const g = await api(d.url, 'GET', `/v1/machines/${m.id}`);
      assert.equal(g.body.status, 'running');
      assert.equal(g.body.expires_at, m.expires_at, 'the TTL is kept across the restart');
      const r = await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, { cmd: ['cat', '/root/note'] });
      assert.equal(r.body.stdout, 'precious\n');
      assert.deepEqual(qemusOf(d.stateDir), pidsBefore, 'the same QEMU process, not a new one');
      const byName = await api(d.url, 'GET', `/v1/machines/keep-${signal.toLowerCase()}`);
      assert.equal(byName.body.id, m.id);
      assert.equal((await api(d.url, 'DELETE', `/v1/machines/${m.id}`)).status, 204);
    });
  }
});

describe('QEMU dead while the daemon was down', () => {
  let d: TestDaemon;
  after(async () => cleanup(d));

  test('the restarted daemon marks the machine failed and leaves nothing behind', async () => {
    d = await startDaemon();
    const m = (await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body;
    const [pid] = qemusOf(d.stateDir);
    assert.ok(pid);
    await d.stop('SIGKILL');
    process.kill(pid, 'SIGKILL');
    await waitFor('qemu gone', async () => (qemusOf(d.stateDir).length === 0 ? true : undefined), 5000);
    d = await startDaemon({ stateDir: d.stateDir });
    const g = await api(d.url, 'GET', `/v1/machines/${m.id}`);
    assert.equal(g.body.status, 'failed');
    assert.match(String(g.body.error), /qemu exited while the daemon was down/);
    assert.equal(existsSync(join(d.stateDir, 'run', String(m.id))), false);
    assert.equal((await api(d.url, 'GET', '/healthz')).body.running, 0);
  });
});

describe('QEMU killed under a running machine', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon();
  });
  after(async () => cleanup(d));

  test('is reported as failed, cleaned up, and the daemon carries on', async () => {
    const m = (await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body;
    const [pid] = qemusOf(d.stateDir);
    assert.ok(pid);
    process.kill(pid, 'SIGKILL');
    const failed = await waitFor(
      'failed status',
      async () => {
        const g = await api(d.url, 'GET', `/v1/machines/${m.id}`);
        return g.body.status === 'failed' ? g.body : undefined;
      },
      5000,
    );
    assert.match(String(failed.error), /qemu exited/);
    assert.equal(qemusOf(d.stateDir).length, 0);
    assert.equal(existsSync(join(d.stateDir, 'run', String(m.id))), false, 'run dir removed');
    const e = await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, { cmd: ['true'] });
    assert.equal(e.status, 409);
    assert.equal(e.body.code, 'MACHINE_NOT_RUNNING');
    const h = await api(d.url, 'GET', '/healthz');
    assert.equal(h.body.running, 0);
    // The daemon is fine: a new machine boots and works.
    const m2 = (await api(d.url, 'POST', '/v1/machines', {})).body;
    assert.equal(
      (await api(d.url, 'POST', `/v1/machines/${m2.id}/exec`, { cmd: ['true'] })).body.exit_code,
      0,
    );
    assert.equal((await api(d.url, 'DELETE', `/v1/machines/${m.id}`)).status, 204);
    assert.equal((await api(d.url, 'GET', `/v1/machines/${m.id}`)).status, 404);
  });
});

describe('persistent machines and caps', () => {
  let strict: TestDaemon;
  let lenient: TestDaemon;
  before(async () => {
    strict = await startDaemon({
      env: { HUTCH_MAX_MACHINES: '1', HUTCH_EXEC_MAX_OUTPUT_BYTES: String(1024 * 1024) },
    });
    lenient = await startDaemon({
      env: { HUTCH_ALLOW_PERSISTENT: '1', HUTCH_MAX_GUEST_MEMORY_MB: '300', HUTCH_MAX_MACHINES: '5' },
    });
  });
  after(async () => {
    await cleanup(strict);
    await cleanup(lenient);
  });

  test('persistent is refused by default: the machine falls back to its TTL', async () => {
    const m = (await api(strict.url, 'POST', '/v1/machines', { persistent: true, ttl_seconds: 120 })).body;
    assert.equal(m.persistent, false);
    assert.equal(m.ttl_seconds, 120);
    assert.ok(m.expires_at);
  });

  test('past the machine cap a create is refused with 429 and nothing changes', async () => {
    const before = (await api(strict.url, 'GET', '/v1/machines')).body.machines;
    const r = await api(strict.url, 'POST', '/v1/machines', {});
    assert.equal(r.status, 429);
    assert.equal(r.body.code, 'RESOURCE_EXHAUSTED');
    assert.match(String(r.body.message), /at most 1 machines/);
    assert.deepEqual((await api(strict.url, 'GET', '/v1/machines')).body.machines, before);
    assert.equal(qemusOf(strict.stateDir).length, 1);
  });

  test("a flood of output is cut at the server's cap and flagged, and the machine carries on", async () => {
    const [m] = (await api(strict.url, 'GET', '/v1/machines')).body.machines as { id: string }[];
    assert.ok(m);
    const r = await api(strict.url, 'POST', `/v1/machines/${m.id}/exec`, {
      cmd: 'head -c 8000000 /dev/zero | tr "\\0" a; echo done >&2',
    });
    assert.equal(r.body.exit_code, 0);
    assert.equal(r.body.truncated, true);
    assert.equal(String(r.body.stdout).length, 1024 * 1024);
    assert.equal(r.body.stderr, 'done\n');
    const again = await api(strict.url, 'POST', `/v1/machines/${m.id}/exec`, { cmd: ['echo', 'still here'] });
    assert.equal(again.body.stdout, 'still here\n');
  });

  test('persistent is honoured when the server allows it', async () => {
    const m = (await api(lenient.url, 'POST', '/v1/machines', { persistent: true })).body;
    assert.equal(m.persistent, true);
    assert.equal(m.expires_at, null);
    assert.equal(m.ttl_seconds, null);
  });

  test('past the guest memory cap a create is refused with 429', async () => {
    const r = await api(lenient.url, 'POST', '/v1/machines', {});
    assert.equal(r.status, 429);
    assert.equal(r.body.code, 'RESOURCE_EXHAUSTED');
    assert.match(String(r.body.message), /guest memory cap/);
    assert.equal(qemusOf(lenient.stateDir).length, 1);
  });
});
