/**
 * Two users side by side on the three APIs of one engine: each sees only their own objects on
 * gRPC, the machines REST API and the boxes REST API, and another user's object is "not found"
 * on every one of them, by id and by name. A gRPC VM is a box: its owner sees it on the boxes API.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { authed } from '../helpers/accounts.js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type BoxdClient, boxdClient, type Msg, rejectsWith, tokenFor } from '../helpers/grpc.js';

const MiB = 1024 * 1024;

describe('two users on gRPC, machines REST and boxes REST', () => {
  let d: TestDaemon;
  const users: Record<string, { token: string; grpc: BoxdClient; boxes: BoxesClient }> = {};
  before(async () => {
    d = await startDaemon();
    for (const name of ['ann', 'ben']) {
      const token = await tokenFor(d, name);
      users[name] = {
        token,
        grpc: boxdClient(d.grpcAddress as string, token),
        boxes: new BoxesClient({ socketPath: d.boxesSocket }, { authorization: `Bearer ${token}` }),
      };
    }
  });
  after(async () => {
    for (const u of Object.values(users)) u.grpc.close();
    await cleanup(d);
  });

  test("each sees their own, and another's is not found by id or name", async () => {
    const ann = users.ann as (typeof users)[string];
    const ben = users.ben as (typeof users)[string];
    const vm = await ann.grpc.call<Msg>('CreateVm', {
      name: 'her-vm',
      config: { memory_bytes: String(512 * MiB), srf: { auto_suspend_timeout_secs: 0 } },
    });
    const m = await authed(
      d.url,
      'POST',
      '/v1/machines',
      { token: ann.token },
      {
        template: 'python',
        ttl_seconds: 300,
        name: 'her-machine',
      },
    );
    assert.equal(m.status, 201, JSON.stringify(m.body));

    // Ann: her VM on gRPC and, being a box, on the boxes API; her machine on the machines API.
    const annVms = await ann.grpc.call<{ vms: Msg[] }>('ListVms', {});
    assert.deepEqual(
      annVms.vms.map((v) => v.vm_id),
      [vm.vm_id],
    );
    const annBoxes = await ann.boxes.list<{ boxes: { id: string; name: string }[] }>();
    assert.deepEqual(
      annBoxes.boxes.map((b) => [b.id, b.name]),
      [[vm.vm_id, 'her-vm']],
    );
    const annMachines = await authed(d.url, 'GET', '/v1/machines', { token: ann.token });
    assert.deepEqual(
      (annMachines.body.machines as { id: string }[]).map((x) => x.id),
      [m.body.id],
    );

    // Ben: nothing, and each of Ann's objects is not found, by id and by name, on every API.
    assert.deepEqual((await ben.grpc.call<{ vms: Msg[] }>('ListVms', {})).vms, []);
    assert.deepEqual((await ben.boxes.list<{ boxes: unknown[] }>()).boxes, []);
    assert.deepEqual((await authed(d.url, 'GET', '/v1/machines', { token: ben.token })).body.machines, []);
    for (const ref of [vm.vm_id as string, 'her-vm']) {
      await rejectsWith(ben.grpc.call('GetVm', { vm_id: ref }), status.NOT_FOUND);
      await rejectsWith(ben.grpc.call('DestroyVm', { vm_id: ref }), status.NOT_FOUND);
      await rejectsWith(ben.grpc.call('ForkVm', { source_vm_id: ref }), status.NOT_FOUND);
      const box = await ben.boxes.raw('GET', `/v1/boxes/${ref}`);
      box.resume();
      assert.equal(box.statusCode, 404, `boxes API: ${ref}`);
    }
    for (const ref of [m.body.id as string, 'her-machine']) {
      const r = await authed(d.url, 'GET', `/v1/machines/${ref}`, { token: ben.token });
      assert.deepEqual([r.status, r.body.code], [404, 'MACHINE_NOT_FOUND']);
    }
    // Ann's objects are untouched by Ben's attempts.
    assert.equal((await ann.grpc.call<Msg>('GetVm', { vm_id: 'her-vm' })).status, 'running');
    await ann.grpc.call('DestroyVm', { vm_id: vm.vm_id });
    assert.equal(
      (await authed(d.url, 'DELETE', `/v1/machines/${m.body.id}`, { token: ann.token })).status,
      204,
    );
  });
});
