/**
 * Attachable disks on real guests: created on the host, hot-plugged into a running machine and
 * mounted before the call answers, detached cleanly (refused while busy), read-write on one
 * machine or read-only on several; their data survives detach/re-attach elsewhere, suspend and
 * resume, a branch (a copy for the clone), a daemon restart and a QEMU killed with the disk
 * attached. REST and gRPC are one engine: both dialects are used on the same disks.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { authed, runHutch, userWithToken } from '../helpers/accounts.js';
import { api, cleanup, type Json, qemusOf, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type BoxdClient, boxdClient, type Msg, rejectsWith } from '../helpers/grpc.js';
import { grpcExec } from '../helpers/grpc-exec.js';

/** A small VM: TCG on 2 cores. */
const small = { vcpu: 1, memory_bytes: String(512 * 2 ** 20), srf: { auto_suspend_timeout_secs: 0 } };

describe('disks', () => {
  let d: TestDaemon;
  let aliceToken: string;
  let bobToken: string;
  let alice: BoxdClient;
  const as = (token: string) => (method: string, path: string, body?: unknown) =>
    authed(d.url, method, path, { token }, body);
  let A: (method: string, path: string, body?: unknown) => Promise<Json>;
  let B: (method: string, path: string, body?: unknown) => Promise<Json>;

  before(async () => {
    d = await startDaemon();
    aliceToken = (await userWithToken(d, 'alice')).token;
    bobToken = (await userWithToken(d, 'bob')).token;
    alice = boxdClient(d.grpcAddress as string, aliceToken);
    A = as(aliceToken);
    B = as(bobToken);
  });
  after(async () => {
    alice.close();
    await cleanup(d);
  });

  const machine = async (name: string): Promise<string> => {
    const r = await A('POST', '/v1/machines', { template: 'python', name, ttl_seconds: 1800 });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    return r.body.id as string;
  };
  const sh = async (
    id: string,
    cmd: string,
    token = aliceToken,
  ): Promise<{ code: number; out: string; err: string }> => {
    const r = await authed(d.url, 'POST', `/v1/machines/${id}/exec`, { token }, { cmd, timeout_ms: 60_000 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return { code: r.body.exit_code as number, out: String(r.body.stdout), err: String(r.body.stderr) };
  };
  /** Writes `mb` MiB of random data to PATH, fsyncs it, and returns its sha256. */
  const writeSynced = async (id: string, path: string, mb = 4): Promise<string> => {
    const r = await sh(
      id,
      `head -c ${mb}M /dev/urandom > ${path}.tmp && mv ${path}.tmp ${path} && sync ${path} && sync && sha256sum ${path} | cut -d' ' -f1`,
    );
    assert.equal(r.code, 0, r.err);
    return r.out.trim();
  };
  const sha = async (id: string, path: string): Promise<string> => {
    const r = await sh(id, `sha256sum ${path} | cut -d' ' -f1`);
    assert.equal(r.code, 0, r.err);
    return r.out.trim();
  };
  const attach = (id: string, disk: string, mount_path: string, read_only = false) =>
    A('POST', `/v1/machines/${id}/disks`, { disk, mount_path, read_only });
  const detach = (id: string, disk: string) => A('DELETE', `/v1/machines/${id}/disks/${disk}`);

  let m1: string;
  let m2: string;
  let data: string;
  let dataSum: string;

  test('create, list, bad input and other users', async () => {
    const c = await A('POST', '/v1/disks', { name: 'data', size_bytes: 256 * 2 ** 20 });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    data = c.body.disk_id as string;
    assert.match(data, /^disk-[0-9a-f]{16}$/);
    assert.equal(c.body.size_bytes, 256 * 2 ** 20);
    assert.equal(c.body.status, 'ready');
    assert.deepEqual(c.body.attachments, []);
    // Sparse: a new 256 MiB disk holds a few MiB of ext4 metadata on the host.
    assert.ok((c.body.used_bytes as number) < 32 * 2 ** 20, String(c.body.used_bytes));
    for (const [body, code, st] of [
      [{ name: 'data', size_bytes: 2 ** 27 }, 'DISK_NAME_TAKEN', 409],
      [{ name: 'bad name', size_bytes: 2 ** 27 }, 'INVALID_ARGUMENT', 400],
      [{ name: 'tiny', size_bytes: 4096 }, 'INVALID_ARGUMENT', 400],
      [{ name: 'huge', size_bytes: 2 ** 52 }, 'INVALID_ARGUMENT', 400],
      [{ name: 'x', size_bytes: -1 }, 'INVALID_ARGUMENT', 400],
      [{ name: 'x', size_bytes: 2 ** 27, extra: 1 }, 'INVALID_ARGUMENT', 400],
    ] as const) {
      const r = await A('POST', '/v1/disks', body);
      assert.equal(r.status, st, JSON.stringify(body));
      assert.equal(r.body.code, code, JSON.stringify(r.body));
    }
    assert.deepEqual(
      ((await A('GET', '/v1/disks')).body.disks as Msg[]).map((x) => x.name),
      ['data'],
    );
    // Bob sees none of it, by id or by name, and cannot touch it.
    assert.deepEqual((await B('GET', '/v1/disks')).body.disks, []);
    assert.equal((await B('GET', `/v1/disks/${data}`)).status, 404);
    assert.equal((await B('DELETE', `/v1/disks/${data}`)).body.code, 'DISK_NOT_FOUND');
    // bob may have a disk of the same name: names are per user.
    assert.equal((await B('POST', '/v1/disks', { name: 'data', size_bytes: 2 ** 27 })).status, 201);
  });

  test('attach mounts it before answering; data survives detach and re-attach to another machine', async () => {
    m1 = await machine('m1');
    m2 = await machine('m2');
    const a = await attach(m1, 'data', '/data');
    assert.equal(a.status, 200, JSON.stringify(a.body));
    assert.deepEqual(a.body.attachments, [
      { vm_id: m1, vm_name: 'm1', mount_path: '/data', mount_mode: 'rw' },
    ]);
    assert.equal(a.body.status, 'attached');
    const mounts = await sh(m1, 'grep " /data " /proc/mounts');
    assert.match(mounts.out, /^\/dev\/sd[a-z]+ \/data ext4 rw/);
    dataSum = await writeSynced(m1, '/data/blob');
    await sh(m1, 'mkdir -p /data/dir/empty && chmod 0751 /data/dir && ln -s blob /data/link && sync');
    // rw on one machine only; not read-only elsewhere while it is rw here.
    for (const ro of [false, true]) {
      const r = await attach(m2, data, '/data', ro);
      assert.equal(r.status, 409, JSON.stringify(r.body));
      assert.equal(r.body.code, 'DISK_ATTACHED');
    }
    assert.equal((await attach(m1, data, '/other')).body.code, 'DISK_ATTACHED');
    // Destroy refused while attached; nothing changed.
    assert.equal((await A('DELETE', `/v1/disks/${data}`)).body.code, 'DISK_ATTACHED');
    const det = await detach(m1, data);
    assert.equal(det.status, 200, JSON.stringify(det.body));
    assert.equal(det.body.status, 'ready');
    assert.equal((await sh(m1, 'grep -c " /data " /proc/mounts')).out.trim(), '0');
    assert.equal((await sh(m1, 'ls /sys/bus/scsi/devices | grep -c "^0:0:"')).out.trim(), '0');
    assert.equal((await detach(m1, data)).body.code, 'DISK_NOT_ATTACHED');
    assert.equal((await attach(m2, data, '/mnt/d')).status, 200);
    assert.equal(await sha(m2, '/mnt/d/blob'), dataSum);
    assert.equal(
      (await sh(m2, 'stat -c %a /mnt/d/dir; readlink /mnt/d/link; test -d /mnt/d/dir/empty && echo e')).out,
      '751\nblob\ne\n',
    );
  });

  test('bad attaches change nothing', async () => {
    const cases: [string, unknown, string][] = [
      [m1, { disk: 'nope', mount_path: '/x' }, 'DISK_NOT_FOUND'],
      [m1, { disk: data, mount_path: 'relative' }, 'INVALID_ARGUMENT'],
      [m1, { disk: data, mount_path: '/a/../b' }, 'INVALID_ARGUMENT'],
      [m1, { disk: data, mount_path: '/' }, 'INVALID_ARGUMENT'],
      [m1, { disk: data, mount_path: '/proc/x' }, 'INVALID_ARGUMENT'],
      [m1, { disk: data, mount_path: '/etc' }, 'INVALID_ARGUMENT'],
      ['m-nope', { disk: data, mount_path: '/x' }, 'MACHINE_NOT_FOUND'],
    ];
    for (const [vm, body, code] of cases) {
      const r = await A('POST', `/v1/machines/${vm}/disks`, body);
      assert.equal(r.body.code, code, `${JSON.stringify(body)}: ${JSON.stringify(r.body)}`);
    }
    // Bob cannot attach alice's disk to his machine, nor his to alice's.
    const bm = await authed(
      d.url,
      'POST',
      '/v1/machines',
      { token: bobToken },
      { template: 'python', ttl_seconds: 600 },
    );
    assert.equal(bm.status, 201);
    assert.equal(
      (await B('POST', `/v1/machines/${bm.body.id}/disks`, { disk: data, mount_path: '/x' })).body.code,
      'DISK_NOT_FOUND',
    );
    assert.equal(
      (await B('POST', `/v1/machines/${m1}/disks`, { disk: 'data', mount_path: '/x' })).body.code,
      'MACHINE_NOT_FOUND',
    );
    await B('DELETE', `/v1/machines/${bm.body.id}`);
    const v = await A('GET', `/v1/disks/${data}`);
    assert.deepEqual(
      (v.body.attachments as Msg[]).map((a) => a.vm_id),
      [m2],
    );
  });

  test('detach is refused while a process has files open there, and nothing changes', async () => {
    // Its own session: the exec's end does not take it down.
    const r = await sh(
      m2,
      'setsid sh -c "exec 3</mnt/d/blob; exec sleep 600" </dev/null >/dev/null 2>&1 & sleep 0.5; pgrep -x sleep',
    );
    const pid = r.out.trim();
    assert.match(pid, /^\d+$/, r.err);
    const busy = await detach(m2, data);
    assert.equal(busy.status, 409, JSON.stringify(busy.body));
    assert.equal(busy.body.code, 'DISK_BUSY');
    assert.equal(await sha(m2, '/mnt/d/blob'), dataSum);
    await sh(m2, `kill ${pid}; sleep 0.2`);
    assert.equal((await detach(m2, data)).status, 200);
  });

  test('read-only on several machines at once; writes there fail', async () => {
    for (const id of [m1, m2]) assert.equal((await attach(id, data, '/ro', true)).status, 200);
    const v = await A('GET', `/v1/disks/${data}`);
    assert.deepEqual(
      (v.body.attachments as Msg[]).map((a) => a.mount_mode),
      ['ro', 'ro'],
    );
    for (const id of [m1, m2]) {
      assert.equal(await sha(id, '/ro/blob'), dataSum);
      const w = await sh(id, 'touch /ro/new');
      assert.notEqual(w.code, 0);
      assert.match(w.err, /Read-only file system/);
    }
    // Read-write while it is read-only elsewhere: refused.
    const m3 = await machine('m3');
    assert.equal((await attach(m3, data, '/rw')).body.code, 'DISK_ATTACHED');
    await A('DELETE', `/v1/machines/${m3}`);
    for (const id of [m1, m2]) assert.equal((await detach(id, data)).status, 200);
  });

  test('suspend and resume three times: the disk stays mounted with its data', async () => {
    assert.equal((await attach(m1, data, '/data')).status, 200);
    const sum2 = await writeSynced(m1, '/data/second', 2);
    // Not synced: only in the guest's page cache, which suspend keeps.
    await sh(m1, 'echo unsynced > /data/cached');
    for (let i = 0; i < 3; i++) {
      const s = await A('POST', `/v1/machines/${m1}/suspend`);
      assert.equal(s.status, 200, JSON.stringify(s.body));
      const r = await A('POST', `/v1/machines/${m1}/resume`);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.equal(await sha(m1, '/data/blob'), dataSum);
      assert.equal(await sha(m1, '/data/second'), sum2);
      assert.equal((await sh(m1, 'cat /data/cached')).out, 'unsynced\n');
    }
  });

  test('branch: the clone gets a copy of a read-write disk (gone with the clone), the source is undisturbed', async () => {
    const b = await A('POST', `/v1/machines/${m1}/branch`, { name: 'm1-fork' });
    assert.equal(b.status, 201, JSON.stringify(b.body));
    const clone = b.body.id as string;
    assert.equal(await sha(clone, '/data/blob'), dataSum);
    assert.equal((await sh(clone, 'cat /data/cached')).out, 'unsynced\n');
    // Independent: the clone's writes are not the source's.
    await sh(clone, 'echo clone > /data/only-in-clone && sync');
    assert.notEqual((await sh(m1, 'test -e /data/only-in-clone')).code, 0);
    const disks = (await A('GET', '/v1/disks')).body.disks as Msg[];
    const copy = disks.find((x) => x.name === `data-${clone}`);
    assert.ok(copy, JSON.stringify(disks));
    assert.deepEqual(
      (copy.attachments as Msg[]).map((a) => [a.vm_id, a.mount_path, a.mount_mode]),
      [[clone, '/data', 'rw']],
    );
    assert.equal((await A('DELETE', `/v1/machines/${clone}`)).status, 204);
    assert.equal((await A('GET', `/v1/disks/${copy.disk_id}`)).status, 404);
    assert.equal(await sha(m1, '/data/blob'), dataSum);
  });

  test("kill -9 of the daemon, then of a QEMU with the disk attached: what was fsync'd is there", async () => {
    const sum3 = await writeSynced(m1, '/data/third', 2);
    await d.stop('SIGKILL');
    d = await startDaemon({ stateDir: d.stateDir });
    alice.close();
    alice = boxdClient(d.grpcAddress as string, aliceToken);
    // Adopted with its disk: still mounted, still listed, still detachable.
    assert.equal(await sha(m1, '/data/third'), sum3);
    const v = await A('GET', `/v1/disks/${data}`);
    assert.deepEqual(
      (v.body.attachments as Msg[]).map((a) => a.vm_id),
      [m1],
    );
    const sum4 = await writeSynced(m1, '/data/fourth', 2);
    const qemu = qemusOf(d.stateDir).find((pid) =>
      readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`guest=hutch-${m1},`),
    );
    assert.ok(qemu);
    process.kill(qemu, 'SIGKILL');
    // The machine failed with its cause; its attachment went with it.
    for (let i = 0; i < 100; i++) {
      const g = await A('GET', `/v1/machines/${m1}`);
      if (g.body.status === 'failed') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const after = await A('GET', `/v1/disks/${data}`);
    assert.deepEqual(after.body.attachments, []);
    assert.equal((await attach(m2, data, '/data')).status, 200);
    for (const [f, s] of [
      ['blob', dataSum],
      ['third', sum3],
      ['fourth', sum4],
    ] as const)
      assert.equal(await sha(m2, `/data/${f}`), s, f);
    assert.equal((await detach(m2, data)).status, 200);
  });

  test('gRPC: the same disks; VmConfig.volumes mounts at create; a cold restart remounts', async () => {
    const list = await alice.call<{ disks: Msg[] }>('ListDisks', {});
    const info = list.disks.find((x) => x.disk_id === data) as Msg;
    assert.equal(info.name, 'data');
    assert.equal(info.size_bytes, String(256 * 2 ** 20));
    assert.ok(String(info.worker_id).length > 0);
    const made = await alice.call<Msg>('CreateDisk', { name: 'g', size_bytes: String(128 * 2 ** 20) });
    assert.equal(made.status, 'ready');
    await rejectsWith(
      alice.call('CreateDisk', { name: 'g', size_bytes: '134217728' }),
      status.ALREADY_EXISTS,
    );
    await rejectsWith(
      alice.call('CreateDisk', { name: '', size_bytes: '134217728' }),
      status.INVALID_ARGUMENT,
    );
    await rejectsWith(
      alice.call('CreateVm', {
        name: 'v-bad',
        config: { ...small, volumes: [{ disk_id: 'disk-0000000000000000', mount_path: '/g' }] },
      }),
      status.NOT_FOUND,
    );
    await rejectsWith(alice.call('GetVm', { vm_id: 'v-bad' }), status.NOT_FOUND);
    await alice.call('CreateVm', {
      name: 'v1',
      config: {
        ...small,
        volumes: [
          { disk_id: made.disk_id, mount_path: '/g', read_only: false },
          { disk_id: 'data', mount_path: '/d', read_only: true },
        ],
      },
    });
    const w = await grpcExec(alice, 'v1', `echo grpc > /g/f && sync && sha256sum /d/blob | cut -d' ' -f1`)
      .done;
    assert.equal(w.out.toString().trim(), dataSum);
    const l2 = await alice.call<{ disks: Msg[] }>('ListDisks', {});
    const g = l2.disks.find((x) => x.disk_id === made.disk_id) as Msg;
    assert.deepEqual(
      (g.attachments as Msg[]).map((a) => [a.vm_name, a.mount_path, a.mount_mode]),
      [['v1', '/g', 'rw']],
    );
    await rejectsWith(alice.call('DestroyDisk', { disk_id: made.disk_id }), status.FAILED_PRECONDITION);
    // Stop and start: a cold boot plugs the disks in at launch and the guest mounts them again.
    await alice.call('StopVm', { vm_id: 'v1' });
    await alice.call('StartVm', { vm_id: 'v1' });
    const r = await grpcExec(alice, 'v1', 'cat /g/f; grep -c " /d ext4 ro" /proc/mounts').done;
    assert.equal(r.out.toString(), 'grpc\n1\n');
    await alice.call('DetachDisk', { disk_id: made.disk_id, vm_id: 'v1' });
    await rejectsWith(
      alice.call('DetachDisk', { disk_id: made.disk_id, vm_id: 'v1' }),
      status.FAILED_PRECONDITION,
    );
    await alice.call('AttachDisk', { disk_id: made.disk_id, vm_id: 'v1', mount_path: '/g2' });
    assert.equal((await grpcExec(alice, 'v1', 'cat /g2/f').done).out.toString(), 'grpc\n');
    // Destroying the VM detaches its disks (unmounted first), which stay.
    await alice.call('DestroyVm', { vm_id: 'v1' });
    const l3 = await alice.call<{ disks: Msg[] }>('ListDisks', {});
    for (const x of l3.disks) assert.deepEqual(x.attachments, [], String(x.name));
    await alice.call('DestroyDisk', { disk_id: made.disk_id });
    await rejectsWith(alice.call('DestroyDisk', { disk_id: made.disk_id }), status.NOT_FOUND);
  });

  test('the CLI', async () => {
    const c = await runHutch({ url: d.url }, 'disk', 'create', 'cli', '--size', '100M', '--json');
    // runHutch runs as the local admin (loopback, no token).
    assert.equal(c.status, 0, c.stderr);
    const disk = JSON.parse(c.stdout) as Msg;
    assert.equal(disk.size_bytes, 100 * 2 ** 20);
    const ls = await runHutch({ url: d.url }, 'disk', 'ls', '--json');
    assert.ok((JSON.parse(ls.stdout).disks as Msg[]).some((x) => x.name === 'cli'));
    const bad = await runHutch({ url: d.url }, 'disk', 'create', 'cli', '--json');
    assert.equal(JSON.parse(bad.stdout).code, 'DISK_NAME_TAKEN');
    assert.equal((await runHutch({ url: d.url }, 'disk', 'rm', 'cli')).status, 0);
  });

  test('deleting machines leaves the disks, and destroying them leaves no file', async () => {
    for (const id of [m1, m2]) await A('DELETE', `/v1/machines/${id}`);
    const v = await A('GET', `/v1/disks/${data}`);
    assert.deepEqual(v.body.attachments, []);
    assert.equal((await A('DELETE', `/v1/disks/${data}`)).status, 204);
    assert.ok(!existsSync(join(d.stateDir, 'disks', `${data}.img`)));
    const left = (await api(d.url, 'GET', '/v1/disks')).body.disks as Msg[];
    assert.ok(!left.some((x) => x.disk_id === data));
  });
});
