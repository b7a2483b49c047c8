import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  api,
  cleanup,
  memoryFilesOf,
  poolReady,
  qemusOf,
  startDaemon,
  type TestDaemon,
  waitFor,
} from '../helpers/daemon.js';

type Body = Record<string, unknown>;

async function sh(d: TestDaemon, id: string, cmd: string): Promise<Body> {
  const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body;
}

async function out(d: TestDaemon, id: string, cmd: string): Promise<string> {
  const r = await sh(d, id, cmd);
  assert.equal(r.exit_code, 0, `${cmd}: ${String(r.stderr)}`);
  return String(r.stdout);
}

async function snapshotReady(d: TestDaemon): Promise<void> {
  await waitFor(
    'template snapshot',
    async () => {
      const h = (await api(d.url, 'GET', '/healthz')).body as { snapshots: Record<string, string> };
      if (h.snapshots.python === 'failed') throw new Error('template snapshot failed');
      return h.snapshots.python === 'ready' ? true : undefined;
    },
    180_000,
  );
}

/** A file on disk, a file in memory (tmpfs) and a background process whose pid we remember. */
async function plant(d: TestDaemon, id: string, tag: string): Promise<string> {
  return (
    await out(
      d,
      id,
      `echo ${tag} > /root/disk-file; echo ${tag} > /dev/shm/mem-file; sync;
       nohup sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 & echo $!`,
    )
  ).trim();
}

async function check(d: TestDaemon, id: string, tag: string, pid: string): Promise<void> {
  assert.equal(await out(d, id, 'cat /root/disk-file /dev/shm/mem-file'), `${tag}\n${tag}\n`);
  assert.equal((await sh(d, id, `kill -0 ${pid}`)).exit_code, 0, `background process ${pid} is alive`);
}

describe('snapshots: restore on create', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon();
    await snapshotReady(d);
  });
  after(async () => cleanup(d));

  test('a create restores from the template snapshot and runs commands', async () => {
    const m = (await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 300 })).body;
    assert.equal(m.mode, 'snapshot');
    assert.equal(m.status, 'running');
    assert.equal(await out(d, String(m.id), 'python3 -c "print(6*7)"'), '42\n');
  });

  test('two clones are independent machines: memory, disk, hostname, randomness, clock', async () => {
    const a = String((await api(d.url, 'POST', '/v1/machines', {})).body.id);
    const b = String((await api(d.url, 'POST', '/v1/machines', {})).body.id);
    await out(d, a, 'echo from-a > /root/mine; echo from-a > /dev/shm/mine');
    assert.equal((await sh(d, b, 'cat /root/mine')).exit_code, 1, "b does not see a's disk write");
    assert.equal((await sh(d, b, 'cat /dev/shm/mine')).exit_code, 1, "b does not see a's memory write");
    const probe =
      'hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; date +%s';
    const [ha, ida, rnda, clocka] = (await out(d, a, probe)).trim().split('\n');
    const [hb, idb, rndb] = (await out(d, b, probe)).trim().split('\n');
    assert.equal(ha, a);
    assert.equal(hb, b);
    assert.match(String(ida), /^[0-9a-f]{32}$/);
    assert.notEqual(ida, idb);
    assert.notEqual(rnda, rndb);
    assert.ok(Math.abs(Number(clocka) - Date.now() / 1000) < 5, "the guest clock is today's");
  });

  test('"mode": "cold" still boots from scratch', async () => {
    const m = (await api(d.url, 'POST', '/v1/machines', { mode: 'cold' })).body;
    assert.equal(m.mode, 'cold');
    assert.equal(await out(d, String(m.id), 'echo ok'), 'ok\n');
  });
});

describe('pause, suspend, resume', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon();
    await snapshotReady(d);
  });
  after(async () => cleanup(d));

  test('three pause/resume and three suspend/resume cycles keep files and processes', async () => {
    const id = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
    const pid = await plant(d, id, 'cycle');
    for (let i = 1; i <= 3; i++) {
      const p = await api(d.url, 'POST', `/v1/machines/${id}/pause`);
      assert.equal(p.body.status, 'paused');
      const e = await api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd: ['true'] });
      assert.equal(e.status, 409, 'a paused machine does not run commands');
      const r = await api(d.url, 'POST', `/v1/machines/${id}/resume`);
      assert.equal(r.body.status, 'running');
      assert.equal(typeof r.body.resume_us, 'number');
      await check(d, id, 'cycle', pid);
      await out(d, id, `echo pause-${i} >> /root/log`);
    }
    for (let i = 1; i <= 3; i++) {
      const s = await api(d.url, 'POST', `/v1/machines/${id}/suspend`);
      assert.equal(s.status, 200, JSON.stringify(s.body));
      assert.equal(s.body.status, 'suspended');
      assert.equal(qemusOf(d.stateDir).length, 0, 'a suspended machine has no QEMU process');
      const r = await api(d.url, 'POST', `/v1/machines/${id}/resume`);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.equal(r.body.status, 'running');
      await check(d, id, 'cycle', pid);
      await out(d, id, `echo suspend-${i} >> /root/log`);
    }
    assert.equal(
      await out(d, id, 'cat /root/log'),
      'pause-1\npause-2\npause-3\nsuspend-1\nsuspend-2\nsuspend-3\n',
    );
    const clock = Number((await out(d, id, 'date +%s')).trim());
    assert.ok(Math.abs(clock - Date.now() / 1000) < 5, 'the clock is corrected after a resume');
  });

  test('a suspended machine survives a daemon restart and resumes with its files', async () => {
    const id = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
    const pid = await plant(d, id, 'restart');
    assert.equal((await api(d.url, 'POST', `/v1/machines/${id}/suspend`)).body.status, 'suspended');
    await d.stop('SIGKILL');
    d = await startDaemon({ stateDir: d.stateDir });
    assert.equal((await api(d.url, 'GET', `/v1/machines/${id}`)).body.status, 'suspended');
    // An exec wakes it up by itself.
    await check(d, id, 'restart', pid);
    assert.equal((await api(d.url, 'GET', `/v1/machines/${id}`)).body.status, 'running');
  });

  test('idle auto-suspend, and an exec wakes the machine', async () => {
    const id = String((await api(d.url, 'POST', '/v1/machines', { auto_suspend_seconds: 2 })).body.id);
    const pid = await plant(d, id, 'idle');
    await waitFor(
      'auto-suspend',
      async () =>
        (await api(d.url, 'GET', `/v1/machines/${id}`)).body.status === 'suspended' ? true : undefined,
      20_000,
    );
    await check(d, id, 'idle', pid);
    const off = await api(d.url, 'POST', `/v1/machines/${id}/auto-suspend`, { seconds: 0 });
    assert.equal(off.body.auto_suspend_seconds, 0);
  });

  test('a QEMU killed in the middle of a suspend leaves no snapshot anything would use', async () => {
    // Writing at 2 MB/s keeps the suspend under way long enough to kill QEMU in the middle.
    const slow = await startDaemon({ env: { HUTCH_MIGRATION_MAX_MBPS: '2' } });
    try {
      await snapshotReady(slow);
      const id = String((await api(slow.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
      await plant(slow, id, 'crash');
      const [qemu] = qemusOf(slow.stateDir);
      assert.ok(qemu);
      const suspending = api(slow.url, 'POST', `/v1/machines/${id}/suspend`);
      await waitFor(
        'suspend under way',
        async () =>
          (await api(slow.url, 'GET', `/v1/machines/${id}`)).body.status === 'suspending' ? true : undefined,
        5000,
      );
      await new Promise((r) => setTimeout(r, 300));
      process.kill(qemu, 'SIGKILL');
      const r = await suspending;
      assert.equal(r.status, 409, JSON.stringify(r.body));
      assert.match(String(r.body.message), /qemu exited during suspend/);
      const m = (await api(slow.url, 'GET', `/v1/machines/${id}`)).body;
      assert.equal(m.status, 'failed');
      const runDir = join(slow.stateDir, 'run', id);
      assert.equal(existsSync(runDir), false, 'no half-written state (or anything else) is left');
      assert.equal(qemusOf(slow.stateDir).length, 0);
      // Resuming it is refused clearly rather than restoring something half-written.
      const again = await api(slow.url, 'POST', `/v1/machines/${id}/resume`);
      assert.equal(again.status, 409);
    } finally {
      await cleanup(slow);
    }
  });

  test('a daemon killed in the middle of a suspend leaves the machine running as it was', async () => {
    let slow = await startDaemon({ env: { HUTCH_MIGRATION_MAX_MBPS: '2' } });
    try {
      await snapshotReady(slow);
      const id = String((await api(slow.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
      const pid = await plant(slow, id, 'daemon-crash');
      void api(slow.url, 'POST', `/v1/machines/${id}/suspend`).catch(() => undefined);
      await waitFor(
        'suspend under way',
        async () =>
          (await api(slow.url, 'GET', `/v1/machines/${id}`)).body.status === 'suspending' ? true : undefined,
        5000,
      );
      await slow.stop('SIGKILL');
      slow = await startDaemon({ stateDir: slow.stateDir, env: { HUTCH_MIGRATION_MAX_MBPS: '2' } });
      const m = (await api(slow.url, 'GET', `/v1/machines/${id}`)).body;
      assert.equal(m.status, 'running', 'the interrupted suspend is undone');
      await check(slow, id, 'daemon-crash', pid);
      const runDir = join(slow.stateDir, 'run', id);
      assert.ok(!readdirSync(runDir).some((f) => f.startsWith('suspend.state')), 'no partial state file');
    } finally {
      await cleanup(slow);
    }
  });

  test('pause, resume and suspend of an unknown machine are 404; a bad auto-suspend is 400', async () => {
    for (const op of ['pause', 'resume', 'suspend']) {
      const r = await api(d.url, 'POST', `/v1/machines/m-00000000/${op}`);
      assert.equal(r.status, 404);
      assert.equal(r.body.code, 'MACHINE_NOT_FOUND');
    }
    const bad = await api(d.url, 'POST', '/v1/machines/m-00000000/auto-suspend', { seconds: -1 });
    assert.equal(bad.status, 400);
  });
});

describe('branch', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon();
    await snapshotReady(d);
  });
  after(async () => cleanup(d));

  test("a branch has the source's files and processes; both go on independently; open execs continue", async () => {
    const src = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
    const pid = await plant(d, src, 'parent');
    // 100 MB, still in the guest's page cache when the branch happens (no sync): it must come
    // over in the clone's memory as well as on its disk.
    const bigSum = await out(
      d,
      src,
      'head -c 100000000 /dev/urandom > /root/big; sha256sum /root/big | cut -c1-64',
    );
    const longExec = api(d.url, 'POST', `/v1/machines/${src}/exec`, { cmd: 'sleep 3; echo finished' });
    await new Promise((r) => setTimeout(r, 500));
    const b = await api(d.url, 'POST', `/v1/machines/${src}/branch`, { ttl_seconds: 300 });
    assert.equal(b.status, 201, JSON.stringify(b.body));
    assert.equal(b.body.mode, 'branch');
    assert.equal(b.body.forked_from, src);
    assert.equal(b.body.ttl_seconds, 300);
    const clone = String(b.body.id);
    assert.deepEqual(
      memoryFilesOf(d.stateDir),
      [`${clone}.ram`, `${src}.ram`].sort(),
      'each machine runs on a memory file of its own',
    );
    assert.equal((await longExec).body.stdout, 'finished\n', "the source's open exec finished normally");
    await check(d, clone, 'parent', pid);
    await check(d, src, 'parent', pid);
    for (const id of [clone, src])
      assert.equal(await out(d, id, 'sha256sum /root/big | cut -c1-64'), bigSum, `the 100 MB file on ${id}`);
    assert.equal(await out(d, clone, 'hostname'), `${clone}\n`);
    await out(d, clone, 'echo clone-only > /root/diverged');
    assert.equal(
      (await sh(d, src, 'cat /root/diverged')).exit_code,
      1,
      "the source does not see the clone's writes",
    );
    await out(d, src, 'echo source-only > /root/source-file');
    assert.equal((await sh(d, clone, 'cat /root/source-file')).exit_code, 1, "nor the clone the source's");
    assert.equal((await api(d.url, 'DELETE', `/v1/machines/${clone}`)).status, 204);
    assert.deepEqual(
      memoryFilesOf(d.stateDir),
      [`${src}.ram`],
      "a deleted machine's memory file goes with it",
    );
    await api(d.url, 'DELETE', `/v1/machines/${src}`);
  });

  test('memory files survive a daemon kill -9 with their machines, and go with the ones that died meanwhile', async () => {
    const keep = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
    const lost = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
    const pid = await plant(d, keep, 'adopted');
    await d.stop('SIGKILL');
    const lostQemu = qemusOf(d.stateDir).find((q) =>
      readFileSync(`/proc/${q}/cmdline`, 'utf8').includes(`hutch-${lost},`),
    );
    assert.ok(lostQemu);
    process.kill(lostQemu, 'SIGKILL');
    d = await startDaemon({ stateDir: d.stateDir });
    assert.deepEqual(memoryFilesOf(d.stateDir), [`${keep}.ram`], 'adopted, or removed: no orphan');
    await check(d, keep, 'adopted', pid);
    const b = await api(d.url, 'POST', `/v1/machines/${keep}/branch`, {});
    assert.equal(b.status, 201, JSON.stringify(b.body));
    await check(d, String(b.body.id), 'adopted', pid);
    for (const id of [keep, String(b.body.id)]) await api(d.url, 'DELETE', `/v1/machines/${id}`);
    assert.deepEqual(memoryFilesOf(d.stateDir), []);
  });

  test('many branches of one source, branches of branches, and deleting parents keeps children working', async () => {
    const root = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
    await out(d, root, 'echo gen0 > /root/lineage');
    const kids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const k = await api(d.url, 'POST', `/v1/machines/${root}/branch`, {});
      assert.equal(k.status, 201, JSON.stringify(k.body));
      kids.push(String(k.body.id));
    }
    const [kid] = kids;
    assert.ok(kid);
    await out(d, kid, 'echo gen1 >> /root/lineage');
    const grand = String((await api(d.url, 'POST', `/v1/machines/${kid}/branch`, {})).body.id);
    await out(d, grand, 'echo gen2 >> /root/lineage');
    assert.equal((await api(d.url, 'DELETE', `/v1/machines/${root}`)).status, 204);
    assert.equal((await api(d.url, 'DELETE', `/v1/machines/${kid}`)).status, 204);
    assert.equal(await out(d, grand, 'cat /root/lineage'), 'gen0\ngen1\ngen2\n');
    for (const k of kids.slice(1)) assert.equal(await out(d, k, 'cat /root/lineage'), 'gen0\n');
    // A suspend/resume cycle reopens the disk chain from its files: still whole.
    assert.equal((await api(d.url, 'POST', `/v1/machines/${grand}/suspend`)).body.status, 'suspended');
    assert.equal((await api(d.url, 'POST', `/v1/machines/${grand}/resume`)).body.status, 'running');
    assert.equal(await out(d, grand, 'cat /root/lineage'), 'gen0\ngen1\ngen2\n');
    for (const m of [grand, ...kids.slice(1)]) await api(d.url, 'DELETE', `/v1/machines/${m}`);
    const layers = join(d.stateDir, 'layers');
    assert.deepEqual(
      existsSync(layers) ? readdirSync(layers) : [],
      [],
      'no layer outlives the last machine on it',
    );
  });

  test('branching an unknown machine is 404', async () => {
    const r = await api(d.url, 'POST', '/v1/machines/m-00000000/branch', {});
    assert.equal(r.status, 404);
  });
});

describe('warm pool', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon({ env: { HUTCH_POOL_SIZE: '2' } });
    await snapshotReady(d);
  });
  after(async () => cleanup(d));

  const pythonPool = (n: number) => poolReady(d, 'python', n, 60_000);

  test('creates are served from the pool, never the same machine twice, and the pool refills', async () => {
    await pythonPool(2);
    const made: Record<string, unknown>[] = [];
    for (let i = 0; i < 3; i++) made.push((await api(d.url, 'POST', '/v1/machines', {})).body);
    assert.deepEqual(
      made.map((m) => m.mode),
      ['pool', 'pool', 'snapshot'],
      'two from the pool, the third restored while it refills',
    );
    const ids = new Set(made.map((m) => String(m.id)));
    assert.equal(ids.size, 3);
    const seen = new Set<string>();
    for (const id of ids) {
      const [host, rnd] = (await out(d, id, 'hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"'))
        .trim()
        .split('\n');
      assert.equal(host, id);
      assert.ok(rnd && !seen.has(rnd), 'each machine has its own randomness');
      seen.add(String(rnd));
    }
    await pythonPool(2);
    const again = (await api(d.url, 'POST', '/v1/machines', {})).body;
    assert.equal(again.mode, 'pool');
    assert.ok(!ids.has(String(again.id)));
    // Pooled machines are not anyone's: they do not show in the list.
    assert.equal(((await api(d.url, 'GET', '/v1/machines')).body.machines as unknown[]).length, 4);
  });
});
