/**
 * The gRPC API's VM lifecycle beyond create/get/destroy, on real VMs: defaults of an empty
 * VmConfig, suspend/resume with their timings, auto-suspend timers, reboot, live fork, a boot
 * command with its restart policy, and user templates.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type BoxdClient, boxdClient, type Msg, rejectsWith, tokenFor } from '../helpers/grpc.js';
import { grpcExec } from '../helpers/grpc-exec.js';

const MiB = 1024 * 1024;
/** Small, and never auto-suspended (tests that look at a running VM do not race the timer). */
const small = { memory_bytes: String(512 * MiB), srf: { auto_suspend_timeout_secs: 0 } };

describe('gRPC API: VM lifecycle', () => {
  let d: TestDaemon;
  let alice: BoxdClient;
  let bob: BoxdClient;
  let vm: Msg;

  before(async () => {
    d = await startDaemon();
    alice = boxdClient(d.grpcAddress as string, await tokenFor(d, 'alice'));
    bob = boxdClient(d.grpcAddress as string, await tokenFor(d, 'bob'));
    vm = await alice.call<Msg>('CreateVm', {
      name: 'a1',
      env: [{ key: 'GREETING', value: 'hello' }],
      config: small,
    });
  });

  after(async () => {
    for (const c of [alice, bob]) {
      const vms = await c.call<{ vms: Msg[] }>('ListVms', {}).catch(() => ({ vms: [] }));
      for (const v of vms.vms) await c.call('DestroyVm', { vm_id: v.vm_id }).catch(() => {});
      c.close();
    }
    await cleanup(d);
  });

  test('CreateVm with no config: 2 vCPUs and min(8 GiB, the server max) of memory', async () => {
    const v = await alice.call<Msg>('CreateVm', {});
    try {
      assert.equal(v.status, 'running');
      assert.equal(v.name, '');
      // SrfConfig unset: a new VM suspends after 30 idle seconds.
      assert.equal((await alice.call<Msg>('GetVm', { vm_id: v.vm_id })).auto_suspend_timeout_secs, 30);
      const r = await grpcExec(alice, v.vm_id as string, 'nproc; grep MemTotal /proc/meminfo').done;
      const [cpus, mem] = r.out.toString().split('\n');
      assert.equal(cpus, '2');
      const kb = Number(/(\d+)/.exec(mem ?? '')?.[1]);
      assert.ok(kb > 7 * 1024 * 1024 && kb <= 8 * 1024 * 1024, `MemTotal ${kb} kB`);
    } finally {
      await alice.call('DestroyVm', { vm_id: v.vm_id });
    }
    await rejectsWith(alice.call('GetVm', { vm_id: v.vm_id }), status.NOT_FOUND);
  });

  test('SuspendVm, ResumeVm, SetAutoSuspendTimeout, RebootVm', async () => {
    await grpcExec(alice, 'a1', 'echo before > /root/mark').done;
    const s = await alice.call<{ suspend_us: string }>('SuspendVm', { vm_id: 'a1' });
    assert.ok(Number(s.suspend_us) > 0, `suspend_us ${s.suspend_us}`);
    assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'a1' })).status, 'suspended');
    const r = await alice.call<{ resume_us: string }>('ResumeVm', { vm_id: vm.vm_id });
    assert.ok(Number(r.resume_us) > 0, `resume_us ${r.resume_us}`);
    assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'a1' })).status, 'running');
    await alice.call('SetAutoSuspendTimeout', { vm_id: 'a1', timeout_secs: 120 });
    assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'a1' })).auto_suspend_timeout_secs, 120);
    await alice.call('SetAutoSuspendTimeout', { vm_id: 'a1', timeout_secs: 0 });
    assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'a1' })).auto_suspend_timeout_secs, 0);
    await rejectsWith(bob.call('SetAutoSuspendTimeout', { vm_id: 'a1', timeout_secs: 5 }), status.NOT_FOUND);
    await rejectsWith(bob.call('SuspendVm', { vm_id: 'a1' }), status.NOT_FOUND);
    const up0 = (await grpcExec(alice, 'a1', 'cut -d. -f1 /proc/uptime').done).out.toString();
    await alice.call('RebootVm', { vm_id: 'a1' });
    const up1 = (await grpcExec(alice, 'a1', 'cut -d. -f1 /proc/uptime; cat /root/mark').done).out.toString();
    assert.ok(Number(up1.split('\n')[0]) <= Number(up0), `uptime ${up0.trim()} → ${up1.trim()}`);
    assert.match(up1, /before/);
  });

  test('ForkVm: a live copy, its size inherited', async () => {
    await grpcExec(alice, 'a1', 'echo parent > /root/forked').done;
    const f = await alice.call<Msg>('ForkVm', { source_vm_id: 'a1', name: 'a1f' });
    try {
      assert.equal(f.forked_from, vm.vm_id);
      assert.equal(f.name, 'a1f');
      assert.match(f.public_ip as string, /^10\.213\.\d+\.\d+$/);
      assert.ok(Number(f.boot_time_ms) >= 0);
      const r = await grpcExec(alice, 'a1f', 'cat /root/forked; echo $GREETING').done;
      assert.equal(r.out.toString(), 'parent\nhello\n');
      assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'a1f' })).auto_suspend_timeout_secs, 0);
      await rejectsWith(
        alice.call('ForkVm', { source_vm_id: 'a1', name: 'a1g', config: { vcpu: 1 } }),
        status.INVALID_ARGUMENT,
      );
      await rejectsWith(bob.call('ForkVm', { source_vm_id: 'a1' }), status.NOT_FOUND);
    } finally {
      await alice.call('DestroyVm', { vm_id: 'a1f' });
    }
  });

  test('CreateVm with cmd and restart_policy: the command runs at boot, its output in the logs', async () => {
    await rejectsWith(
      alice.call('CreateVm', { name: 'c0', cmd: ['true'], restart_policy: 'sometimes', config: small }),
      status.INVALID_ARGUMENT,
    );
    const v = await alice.call<Msg>('CreateVm', {
      name: 'c1',
      cmd: ['/bin/sh', '-c', 'echo CMD-OUT-$GREETING; exec sleep 1000'],
      env: [{ key: 'GREETING', value: 'hi' }],
      restart_policy: 'always',
      config: small,
    });
    try {
      assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'c1' })).restart_policy, 'always');
      let logs = '';
      for (let i = 0; i < 50 && !logs.includes('CMD-OUT-hi'); i++) {
        logs = await new Promise<string>((resolve, reject) => {
          let out = '';
          const s = (alice.raw.StreamLogs as (r: Msg, m: unknown) => NodeJS.EventEmitter)(
            { vm_id: 'c1' },
            alice.meta(),
          );
          s.on('data', (m: { data: Buffer }) => {
            out += m.data.toString('latin1');
          });
          s.on('end', () => resolve(out));
          s.on('error', reject);
        });
        await new Promise((r) => setTimeout(r, 200));
      }
      assert.match(logs, /CMD-OUT-hi/);
    } finally {
      await alice.call('DestroyVm', { vm_id: v.vm_id });
    }
  });

  test('templates: CreateTemplate, ListTemplates, CreateVmFromTemplate, CreateVm by template name, DeleteTemplate', async () => {
    const t = await alice.call<Msg>('CreateTemplate', {
      name: 'tpl1',
      image_ref: 'debian:bookworm',
      config: { vcpu: 1, memory_bytes: String(512 * MiB) },
    });
    assert.equal(t.name, 'tpl1');
    assert.equal(t.status, 'ready');
    const list = (await alice.call<{ templates: Msg[] }>('ListTemplates', {})).templates;
    assert.deepEqual(list, [
      {
        template_id: t.template_id,
        name: 'tpl1',
        image_ref: 'debian:bookworm',
        status: 'ready',
        vcpu: 1,
        memory_bytes: String(512 * MiB),
      },
    ]);
    assert.deepEqual((await bob.call<{ templates: Msg[] }>('ListTemplates', {})).templates, []);
    await rejectsWith(bob.call('CreateVmFromTemplate', { template_id: 'tpl1' }), status.NOT_FOUND);
    await rejectsWith(alice.call('CreateVmFromTemplate', { template_id: '' }), status.INVALID_ARGUMENT);
    const a = await alice.call<Msg>('CreateVmFromTemplate', { template_id: t.template_id, name: 't1' });
    const b = await alice.call<Msg>('CreateVm', { name: 't2', image_ref: 'tpl1' });
    try {
      assert.equal(a.status, 'running');
      assert.ok(Number(a.boot_time_ms) > 0);
      for (const id of ['t1', 't2']) {
        const r = await grpcExec(alice, id, 'nproc; grep MemTotal /proc/meminfo').done;
        const [cpus, mem] = r.out.toString().split('\n');
        assert.equal(cpus, '1', id);
        assert.ok(Number(/(\d+)/.exec(mem ?? '')?.[1]) <= 512 * 1024, `${id}: ${mem}`);
      }
      assert.equal((await alice.call<Msg>('GetVm', { vm_id: b.vm_id })).auto_suspend_timeout_secs, 30);
    } finally {
      await alice.call('DestroyVm', { vm_id: a.vm_id });
      await alice.call('DestroyVm', { vm_id: b.vm_id });
    }
    await alice.call('DeleteTemplate', { template_id: 'tpl1' });
    assert.deepEqual((await alice.call<{ templates: Msg[] }>('ListTemplates', {})).templates, []);
    await rejectsWith(alice.call('DeleteTemplate', { template_id: 'tpl1' }), status.NOT_FOUND);
  });
});
