/**
 * Hostile clients and guests against attachable disks: requests without credentials, bodies and
 * mount paths that are not what they claim, other users' disks and machines, races for one
 * disk, a quota; guests that unmount or drop their disk behind the daemon's back, scribble over
 * the raw device or fill it. Each must be refused (or tolerated) with a clear answer, change
 * nothing it should not, and leave the daemon serving everyone else.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { authed, userWithToken } from '../helpers/accounts.js';
import { api, cleanup, type Json, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type BoxdClient, boxdClient, rejectsWith } from '../helpers/grpc.js';
import { bugLines, memoryOf, Tally } from '../helpers/hostile.js';

const MiB = 2 ** 20;

describe('hostile: disks', () => {
  const tally = new Tally('disks');
  let d: TestDaemon;
  let alice: string;
  let bob: string;
  let bobGrpc: BoxdClient;
  let m1: string;
  let m2: string;
  let disk: string;
  const A = (method: string, path: string, body?: unknown): Promise<Json> =>
    authed(d.url, method, path, { token: alice }, body);
  const B = (method: string, path: string, body?: unknown): Promise<Json> =>
    authed(d.url, method, path, { token: bob }, body);
  const sh = async (id: string, cmd: string): Promise<{ code: number; out: string; err: string }> => {
    const r = await A('POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 120_000 });
    return { code: r.body.exit_code as number, out: String(r.body.stdout), err: String(r.body.stderr) };
  };

  before(async () => {
    // A small quota, so that hitting it is cheap.
    d = await startDaemon({ env: { HUTCH_DISK_QUOTA_BYTES: String(4 * 1024 * MiB) } });
    alice = (await userWithToken(d, 'alice')).token;
    bob = (await userWithToken(d, 'bob')).token;
    bobGrpc = boxdClient(d.grpcAddress as string, bob);
    for (const name of ['h1', 'h2']) {
      const r = await A('POST', '/v1/machines', { template: 'python', name, ttl_seconds: 1800 });
      assert.equal(r.status, 201, JSON.stringify(r.body));
      if (name === 'h1') m1 = r.body.id as string;
      else m2 = r.body.id as string;
    }
    const c = await A('POST', '/v1/disks', { name: 'd', size_bytes: 128 * MiB });
    assert.equal(c.status, 201);
    disk = c.body.disk_id as string;
  });
  after(async () => {
    bobGrpc.close();
    await cleanup(d);
  });

  test('hostile clients', async () => {
    const endpoints: [string, string, unknown?][] = [
      ['POST', '/v1/disks', { name: 'x', size_bytes: 128 * MiB }],
      ['GET', '/v1/disks'],
      ['GET', `/v1/disks/${disk}`],
      ['DELETE', `/v1/disks/${disk}`],
      ['GET', `/v1/machines/${m1}/disks`],
      ['POST', `/v1/machines/${m1}/disks`, { disk, mount_path: '/x' }],
      ['DELETE', `/v1/machines/${m1}/disks/${disk}`],
    ];
    for (const [method, path, body] of endpoints)
      await tally.check(`${method} ${path} with a forged token`, async () => {
        const r = await authed(d.url, method, path, { token: `${alice.slice(0, -4)}AAAA` }, body);
        assert.equal(r.status, 401, JSON.stringify(r.body));
        return undefined;
      });
    const badBodies: [string, unknown][] = [
      ['a 10 KB name', { name: 'a'.repeat(10_000), size_bytes: 128 * MiB }],
      ['a name with a slash', { name: '../../etc', size_bytes: 128 * MiB }],
      ['an SQL name', { name: "'; DROP TABLE disks;--", size_bytes: 128 * MiB }],
      ['size as a string', { name: 's', size_bytes: '134217728' }],
      ['a fractional size', { name: 's', size_bytes: 134217728.5 }],
      ['a negative size', { name: 's', size_bytes: -1 }],
      ['a size past 2^53', { name: 's', size_bytes: 2 ** 60 }],
      ['an array body', [{ name: 's' }]],
      ['null', null],
      ['an unknown field', { name: 's', size_bytes: 128 * MiB, path: '/etc/shadow' }],
    ];
    for (const [what, body] of badBodies)
      await tally.check(`create with ${what}`, async () => {
        const r = await A('POST', '/v1/disks', body);
        assert.equal(r.status, 400, `${what}: ${JSON.stringify(r.body)}`);
        return undefined;
      });
    await tally.check('create with a body that is not JSON', async () => {
      const r = await api(d.url, 'POST', '/v1/disks', undefined, '{"name": "x", "size_bytes": ');
      assert.equal(r.status, 400);
      return undefined;
    });
    const paths = [
      '/../../etc',
      'data',
      '/data/../etc',
      '//data',
      '/data/./x',
      '/',
      '/proc/self',
      '/sys/kernel',
      '/dev/sda',
      '/run/hutch',
      '/etc',
      `/${'a'.repeat(300)}`,
      '/data\nx',
      '/data\u0000x',
    ];
    for (const p of paths)
      await tally.check(`attach at ${JSON.stringify(p.slice(0, 40))}`, async () => {
        const r = await A('POST', `/v1/machines/${m1}/disks`, { disk, mount_path: p });
        assert.equal(r.status, 400, JSON.stringify(r.body));
        return undefined;
      });
    await tally.check('guessed disk ids are not found', async () => {
      for (let i = 0; i < 50; i++) {
        const r = await A('GET', `/v1/disks/disk-${randomBytes(8).toString('hex')}`);
        assert.equal(r.status, 404);
      }
      return undefined;
    });
    await tally.check("another user's disk and machine: not found, for every verb and dialect", async () => {
      assert.equal((await B('GET', `/v1/disks/${disk}`)).status, 404);
      assert.equal((await B('DELETE', `/v1/disks/${disk}`)).status, 404);
      assert.equal((await B('POST', `/v1/machines/${m1}/disks`, { disk, mount_path: '/x' })).status, 404);
      assert.equal((await B('DELETE', `/v1/machines/${m1}/disks/${disk}`)).status, 404);
      assert.equal((await B('GET', `/v1/machines/${m1}/disks`)).status, 404);
      await rejectsWith(bobGrpc.call('DestroyDisk', { disk_id: disk }), status.NOT_FOUND);
      await rejectsWith(
        bobGrpc.call('AttachDisk', { disk_id: disk, vm_id: m1, mount_path: '/x' }),
        status.NOT_FOUND,
      );
      const bm = await B('POST', '/v1/machines', { template: 'python', ttl_seconds: 600 });
      assert.equal(
        (await B('POST', `/v1/machines/${bm.body.id}/disks`, { disk, mount_path: '/x' })).status,
        404,
      );
      await B('DELETE', `/v1/machines/${bm.body.id}`);
      assert.equal((await A('GET', `/v1/disks/${disk}`)).body.status, 'ready');
      return undefined;
    });
    await tally.check('ten racing creates of one name: exactly one disk', async () => {
      const rs = await Promise.all(
        Array.from({ length: 10 }, () => A('POST', '/v1/disks', { name: 'race', size_bytes: 64 * MiB })),
      );
      assert.equal(rs.filter((r) => r.status === 201).length, 1, rs.map((r) => r.status).join(' '));
      assert.ok(rs.every((r) => r.status === 201 || r.body.code === 'DISK_NAME_TAKEN'));
      return undefined;
    });
    await tally.check(
      'racing read-write attaches of one disk to two machines: exactly one wins',
      async () => {
        const rs = await Promise.all(
          [m1, m2, m1, m2].map((m, i) =>
            A('POST', `/v1/machines/${m}/disks`, { disk, mount_path: `/race${i}` }),
          ),
        );
        const won = rs.filter((r) => r.status === 200);
        assert.equal(won.length, 1, rs.map((r) => `${r.status} ${r.body.code ?? ''}`).join(', '));
        const v = await A('GET', `/v1/disks/${disk}`);
        assert.equal((v.body.attachments as unknown[]).length, 1);
        const at = (v.body.attachments as { vm_id: string }[])[0]?.vm_id as string;
        assert.equal((await A('DELETE', `/v1/machines/${at}/disks/${disk}`)).status, 200);
        return undefined;
      },
    );
    await tally.check('the quota: disks past it are refused', async () => {
      // Past the largest disk (HUTCH_DISK_MAX_BYTES, 1 TiB): a bad size.
      const r = await A('POST', '/v1/disks', { name: 'big', size_bytes: 2 * 1024 * 1024 * MiB });
      assert.equal(r.body.code, 'INVALID_ARGUMENT', JSON.stringify(r.body));
      // Within it, but past the user's quota (4 GiB here) with the disks made so far.
      const q = await A('POST', '/v1/disks', { name: 'q1', size_bytes: 4 * 1024 * MiB });
      assert.equal(q.body.code, 'RESOURCE_EXHAUSTED', JSON.stringify(q.body));
      const names = ((await A('GET', '/v1/disks')).body.disks as { name: string }[]).map((x) => x.name);
      assert.ok(!names.includes('big') && !names.includes('q1'), names.join(' '));
      return undefined;
    });
  });

  test('hostile guests', async () => {
    await tally.check('the guest unmounts its disk itself: detach still works', async () => {
      assert.equal((await A('POST', `/v1/machines/${m1}/disks`, { disk, mount_path: '/g' })).status, 200);
      assert.equal((await sh(m1, 'umount /g && echo ok')).out, 'ok\n');
      const r = await A('DELETE', `/v1/machines/${m1}/disks/${disk}`);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      return undefined;
    });
    await tally.check('the guest drops the SCSI device under the mount: detach still works', async () => {
      assert.equal((await A('POST', `/v1/machines/${m1}/disks`, { disk, mount_path: '/g' })).status, 200);
      await sh(m1, 'echo 1 > /sys/bus/scsi/devices/0:0:0:0/delete');
      const r = await A('DELETE', `/v1/machines/${m1}/disks/${disk}`);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      return undefined;
    });
    await tally.check('the guest fills its disk: the host file stays within its size', async () => {
      assert.equal((await A('POST', `/v1/machines/${m2}/disks`, { disk, mount_path: '/f' })).status, 200);
      const r = await sh(m2, 'dd if=/dev/zero of=/f/fill bs=1M 2>&1; sync; df -m /f | tail -1');
      assert.match(r.out, /No space left on device/);
      const size = statSync(join(d.stateDir, 'disks', `${disk}.img`));
      assert.ok(size.blocks * 512 <= 128 * MiB + MiB, String(size.blocks * 512));
      assert.equal((await A('DELETE', `/v1/machines/${m2}/disks/${disk}`)).status, 200);
      return undefined;
    });
    await tally.check(
      'the guest scribbles over the raw device: the next mount fails clearly, nothing recorded',
      async () => {
        assert.equal((await A('POST', `/v1/machines/${m2}/disks`, { disk, mount_path: '/s' })).status, 200);
        await sh(m2, 'umount /s; dd if=/dev/urandom of=/dev/sda bs=1M count=8 conv=fsync 2>/dev/null; true');
        assert.equal((await A('DELETE', `/v1/machines/${m2}/disks/${disk}`)).status, 200);
        const r = await A('POST', `/v1/machines/${m1}/disks`, { disk, mount_path: '/s' });
        assert.equal(r.status, 422, JSON.stringify(r.body));
        assert.match(String(r.body.message), /could not be mounted/);
        const v = await A('GET', `/v1/disks/${disk}`);
        assert.deepEqual(v.body.attachments, []);
        assert.equal((await sh(m1, 'ls /sys/bus/scsi/devices | grep -c "^0:"')).out.trim(), '0');
        assert.equal((await A('DELETE', `/v1/disks/${disk}`)).status, 204);
        return undefined;
      },
    );
    await tally.check('memory: 500 bad requests later the daemon has not grown', async () => {
      const before = memoryOf(d.proc.pid as number).rssMb;
      for (let i = 0; i < 500; i++)
        await A('POST', `/v1/machines/${m1}/disks`, { disk: `nope-${i}`, mount_path: '/x'.repeat(i % 50) });
      const grown = memoryOf(d.proc.pid as number).rssMb - before;
      assert.ok(grown < 40, `${grown} MiB`);
      return `${grown} MiB`;
    });
    await tally.check('the daemon logged no unhandled error', () => {
      assert.deepEqual(bugLines(d.log()), []);
      return undefined;
    });
    tally.report();
  });
});
