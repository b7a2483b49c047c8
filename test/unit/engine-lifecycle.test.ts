// The engine's lifecycle, crash recovery and cleanup stack against an in-memory hypervisor
// (test/helpers/fake-vmm.ts): every transition, every recovery case, in seconds, without QEMU.
// The same flows run against QEMU in test/integration/.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import type { Log } from '../../src/background.js';
import { loadConfig } from '../../src/config.js';
import { actionsFor } from '../../src/core/dispatch.js';
import { localPrincipal, type Principal } from '../../src/core/principal.js';
import { CleanupStack, ends } from '../../src/engine/cleanup-stack.js';
import { Engine } from '../../src/engine/engine.js';
import {
  allowedTransitions,
  checkTransition,
  type LifecycleEvent,
  nextState,
  recoveryOf,
} from '../../src/engine/lifecycle.js';
import { type MachineRow, type MachineState, Store } from '../../src/engine/store.js';
import { HutchError } from '../../src/errors.js';
import type { TemplateManifest } from '../../src/images/builder.js';
import { FakeVmm } from '../helpers/fake-vmm.js';

const states: MachineState[] = [
  'starting',
  'running',
  'paused',
  'suspending',
  'suspended',
  'resuming',
  'failed',
  'destroying',
  'stopping',
  'stopped',
];
const events: LifecycleEvent[] = [
  'booted',
  'pause',
  'continue',
  'suspend',
  'suspended',
  'suspend-undone',
  'wake',
  'woke',
  'wake-failed',
  'stop',
  'stopped',
  'start',
  'destroy',
  'fail',
  'branch',
  'work',
];

const roots: string[] = [];
after(() => {
  for (const r of roots) rmSync(r, { recursive: true, force: true });
});

interface Rig {
  engine: Engine;
  vmm: FakeVmm;
  dir: string;
  logs: { level: string; msg: string; fields: Record<string, unknown> }[];
  alice: Principal;
  reopen(): Promise<Rig>;
}

async function rig(shared?: { dir: string; vmm: FakeVmm; env?: NodeJS.ProcessEnv }): Promise<Rig> {
  const dir = shared?.dir ?? mkdtempSync(join(tmpdir(), 'hutch-engine-'));
  if (!shared) roots.push(dir);
  const imageDir = join(dir, 'images');
  mkdirSync(imageDir, { recursive: true });
  const kernel = join(imageDir, 'vmlinux');
  const rootfs = join(imageDir, 'rootfs.img');
  writeFileSync(kernel, 'kernel');
  writeFileSync(rootfs, Buffer.alloc(1024 * 1024));
  const manifest: TemplateManifest = {
    name: 'python',
    hash: 'h1',
    kernel,
    rootfs,
    cmdline: 'console=ttyS0',
    kernelHz: 100,
    builtAt: '',
    buildSeconds: 0,
  };
  const config = loadConfig({ stateDir: dir, imageDir, poolSize: 0, maxMachines: 8 }, shared?.env ?? {});
  const vmm = shared?.vmm ?? new FakeVmm();
  const logs: Rig['logs'] = [];
  const log: Log = (level, msg, fields = {}) => logs.push({ level, msg, fields });
  const engine = new Engine(config, new Map([['python', manifest]]), { accel: 'tcg', reason: 'test' }, log, {
    hypervisor: vmm.hypervisor,
    guest: vmm.guest,
    runAs: null,
  });
  await engine.start();
  const r: Rig = {
    engine,
    vmm,
    dir,
    logs,
    alice: localPrincipal('alice'),
    reopen: async () => {
      await engine.close();
      return rig({ dir, vmm });
    },
  };
  return r;
}

async function rejects(p: Promise<unknown> | (() => unknown), code: string): Promise<void> {
  await assert.rejects(
    async () => (typeof p === 'function' ? p() : p),
    (e: unknown) => e instanceof HutchError && e.code === code,
  );
}

describe('lifecycle table', () => {
  test('every state × event pair is either a listed transition or a refusal naming the state', () => {
    for (const kind of ['machine', 'box'] as const) {
      const allowed = new Map(allowedTransitions(kind).map(([s, e, to]) => [`${s}/${e}`, to]));
      for (const state of states)
        for (const event of events) {
          const row = { id: 'x', kind, state, error: null } as unknown as MachineRow;
          const to = allowed.get(`${state}/${event}`);
          if (to !== undefined) {
            assert.equal(checkTransition(row, event), to, `${kind} ${state} ${event}`);
          } else {
            assert.throws(
              () => checkTransition(row, event),
              (e: unknown) =>
                e instanceof HutchError &&
                e.code === (kind === 'box' ? 'BOX_NOT_RUNNING' : 'MACHINE_NOT_RUNNING') &&
                e.message.includes(`it is ${state}`),
              `${kind} ${state} ${event} should be refused`,
            );
          }
        }
    }
  });

  test('policies: a failed machine keeps its row as failed, a failed box is stopped; only boxes stop', () => {
    assert.equal(nextState('machine', 'running', 'fail'), 'failed');
    assert.equal(nextState('box', 'running', 'fail'), 'stopped');
    assert.equal(nextState('machine', 'running', 'stop'), undefined);
    assert.equal(nextState('box', 'running', 'suspend'), 'suspending');
    assert.equal(nextState('box', 'suspending', 'fail'), 'stopped', 'a box lost mid-suspend is stopped');
    assert.equal(nextState('box', 'suspended', 'stop'), 'stopping', 'a suspended box is woken to stop');
    const machineStates = states.filter((s) => s !== 'stopping' && s !== 'stopped');
    for (const s of machineStates)
      if (nextState('machine', s, 'destroy') === undefined) assert.fail(`cannot destroy a ${s} machine`);
    for (const s of ['starting', 'running', 'stopping', 'stopped'] as const)
      if (nextState('box', s, 'destroy') === undefined) assert.fail(`cannot remove a ${s} box`);
  });

  test('recovery after a restart, from the state and what is found on the host', () => {
    const row = (state: MachineState, kind: 'machine' | 'box' = 'machine', started = false): MachineRow =>
      ({ id: 'x', kind, state, started_at: started ? 'now' : null }) as unknown as MachineRow;
    const cases: [MachineRow, boolean, boolean, string][] = [
      [row('running'), true, false, 'adopt-running'],
      [row('running'), false, false, 'fail'],
      [row('paused'), true, false, 'adopt-paused'],
      [row('suspending'), true, true, 'finish-suspend'],
      [row('suspending'), true, false, 'undo-suspend'],
      [row('suspending'), false, true, 'back-to-suspended'],
      [row('suspending'), false, false, 'fail'],
      [row('resuming'), true, true, 'back-to-suspended'],
      [row('resuming'), false, false, 'fail'],
      [row('suspended'), false, true, 'keep'],
      [row('starting'), true, false, 'remove'],
      [row('starting', 'box', true), false, false, 'box-stopped'],
      [row('starting', 'box', false), true, false, 'remove'],
      [row('stopping', 'box'), true, false, 'box-stopped'],
      [row('destroying'), true, false, 'remove'],
      [row('suspending', 'box', true), true, true, 'finish-suspend'],
      [row('suspending', 'box', true), true, false, 'undo-suspend'],
      [row('suspending', 'box', true), false, false, 'fail'],
      [row('resuming', 'box', true), false, true, 'back-to-suspended'],
      [row('suspended', 'box', true), false, true, 'keep'],
      [row('paused', 'box', true), true, false, 'adopt-paused'],
    ];
    for (const [r, alive, saved, want] of cases)
      assert.equal(
        recoveryOf(r, { alive, saved }),
        want,
        `${r.kind} ${r.state} alive=${alive} saved=${saved}`,
      );
  });
});

describe('cleanup stack', () => {
  test('runs each ending once, newest first, past failures; later resources are undone at once', async () => {
    const done: string[] = [];
    const s = new CleanupStack();
    s.push('run dir', ends.machine, () => done.push('run dir'));
    s.push('qemu', ends.vm, () => done.push('qemu'));
    s.push('agent', ends.handle, () => {
      done.push('agent');
      throw new Error('already closed');
    });
    s.push('console', ends.handle, () => done.push('console'));
    const detached = await s.run('detach');
    assert.deepEqual(done, ['console', 'agent']);
    assert.equal(detached[0]?.what, 'agent');
    assert.deepEqual(s.list(), ['run dir', 'qemu']);
    await s.run('halt');
    assert.deepEqual(done, ['console', 'agent', 'qemu']);
    await s.run('destroy');
    await s.run('destroy');
    assert.deepEqual(done, ['console', 'agent', 'qemu', 'run dir']);
    s.push('tap', ends.vm, () => done.push('tap'));
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(done.at(-1), 'tap');
    assert.deepEqual(s.list(), []);
  });
});

describe('engine with a fake hypervisor', () => {
  test('create → exec → pause → resume → suspend → exec wakes it → destroy leaves nothing', async () => {
    const { engine, vmm, dir, alice } = await rig();
    const m = await engine.create(alice, { template: 'python' });
    assert.equal(m.status, 'running');
    assert.equal(m.mode, 'cold');
    assert.equal(vmm.running().length, 1);
    await engine.exec(alice, m.id, { argv: ['write', '/root/f', 'kept'] });
    assert.equal((await engine.pause(alice, m.id)).status, 'paused');
    await rejects(engine.pause(alice, 'm-nothere'), 'MACHINE_NOT_FOUND');
    assert.equal((await engine.resume(alice, m.id)).status, 'running');
    const s = await engine.suspend(alice, m.id);
    assert.equal(s.status, 'suspended');
    assert.equal(vmm.running().length, 0, 'a suspended machine has no QEMU');
    assert.ok(existsSync(join(dir, 'run', m.id, 'suspend.state')));
    assert.ok(existsSync(join(dir, 'run', m.id, 'suspend.ram')), 'RAM is saved beside the device state');
    assert.deepEqual(vmm.ramFiles(), [], 'a suspended machine holds no RAM file');
    // Work on a suspended machine wakes it, with what it had in memory.
    const r = await engine.exec(alice, m.id, { argv: ['read', '/root/f'] });
    assert.equal(r.stdout.toJSON(), 'kept');
    assert.equal(engine.get(alice, m.id).status, 'running');
    await engine.destroy(alice, m.id);
    await rejects(async () => engine.get(alice, m.id), 'MACHINE_NOT_FOUND');
    assert.equal(vmm.running().length, 0);
    assert.deepEqual(readdirSync(join(dir, 'run')), []);
    assert.deepEqual(vmm.ramFiles(), [], 'the RAM file goes with the machine');
    await engine.close();
  });

  test("another owner's machine does not exist for them; lifecycle refusals name the state", async () => {
    const { engine, alice } = await rig();
    const bob = localPrincipal('bob');
    const m = await engine.create(alice, { template: 'python', name: 'shared-name' });
    await rejects(async () => engine.get(bob, m.id), 'MACHINE_NOT_FOUND');
    await rejects(engine.destroy(bob, m.id), 'MACHINE_NOT_FOUND');
    await rejects(engine.exec(bob, m.id, { argv: ['true'] }), 'MACHINE_NOT_FOUND');
    assert.deepEqual(engine.list(bob), []);
    // Names are per owner.
    const b = await engine.create(bob, { template: 'python', name: 'shared-name' });
    assert.equal(engine.get(bob, 'shared-name').id, b.id);
    await engine.suspend(alice, m.id);
    await assert.rejects(engine.pause(alice, m.id), /cannot pause machine .*: it is suspended/);
    await engine.close();
  });

  test('branch: the clone runs with the source memory; the source runs on', async () => {
    const { engine, vmm, alice } = await rig();
    const src = await engine.create(alice, { template: 'python' });
    await engine.exec(alice, src.id, { argv: ['write', 'k', 'v1'] });
    const clone = await engine.branch(alice, src.id, {});
    assert.equal(clone.status, 'running');
    assert.equal(clone.forked_from, src.id);
    assert.equal((await engine.exec(alice, clone.id, { argv: ['read', 'k'] })).stdout.toJSON(), 'v1');
    assert.equal(engine.get(alice, src.id).status, 'running');
    assert.equal(vmm.running().length, 2);
    assert.deepEqual(
      vmm.ramFiles().sort(),
      [`${clone.id}.ram`, `${src.id}.ram`].sort(),
      'each machine has its own RAM file',
    );
    await engine.close();
  });

  test('a failed suspend leaves the machine running with everything it had', async () => {
    const { engine, vmm, alice } = await rig();
    const m = await engine.create(alice, { template: 'python' });
    vmm.faults.saveFails = true;
    await rejects(engine.suspend(alice, m.id), 'STORAGE_FULL');
    vmm.faults.saveFails = false;
    assert.equal(engine.get(alice, m.id).status, 'running');
    assert.equal((await engine.exec(alice, m.id, { argv: ['echo', 'hi'] })).stdout.toJSON(), 'echo hi');
    await engine.close();
  });

  test('a boot that fails removes everything it made', async () => {
    const { engine, vmm, dir, alice } = await rig();
    vmm.faults.agentDead = true;
    await rejects(engine.create(alice, { template: 'python' }), 'BOOT_FAILED');
    vmm.faults.agentDead = false;
    assert.deepEqual(engine.list(alice), []);
    assert.equal(vmm.running().length, 0);
    assert.deepEqual(readdirSync(join(dir, 'run')), []);
    await engine.close();
  });

  test('QEMU dying under a running machine fails it with the cause, and its resources go', async () => {
    const { engine, vmm, dir, alice } = await rig();
    const m = await engine.create(alice, { template: 'python' });
    vmm.crash(m.id);
    for (let i = 0; i < 100 && engine.get(alice, m.id).status !== 'failed'; i++)
      await new Promise((r) => setTimeout(r, 20));
    const v = engine.get(alice, m.id);
    assert.equal(v.status, 'failed');
    assert.match(v.error ?? '', /qemu exited unexpectedly/);
    assert.ok(!existsSync(join(dir, 'run', m.id)));
    await engine.destroy(alice, m.id);
    assert.deepEqual(engine.list(alice), []);
    await engine.close();
  });

  test('caps and per-caller quotas are checked at insert', async () => {
    const { engine, alice } = await rig();
    const limited: Principal = { ...localPrincipal('carol'), quota: { maxActive: 1 } };
    await engine.create(limited, { template: 'python' });
    await rejects(engine.create(limited, { template: 'python' }), 'RESOURCE_EXHAUSTED');
    for (let i = 0; i < 7; i++) await engine.create(alice, { template: 'python' });
    await rejects(engine.create(alice, { template: 'python' }), 'RESOURCE_EXHAUSTED');
    await engine.close();
  });

  test('boxes: a machine with the box policy (stop keeps the disk, start boots it again, failure stops it)', async () => {
    const { engine, vmm, dir, alice } = await rig();
    const image = {
      resolve: async () => ({
        name: 'debian',
        hash: 'img1',
        kernel: join(dir, 'images', 'vmlinux'),
        rootfs: join(dir, 'images', 'rootfs.img'),
        cmdline: 'console=ttyS0',
        kernelHz: 100,
        builtAt: '',
        buildSeconds: 0,
        ref: 'debian:bookworm',
        digest: 'sha256:1',
        env: [],
        workdir: null,
      }),
    };
    // A second engine over the same state, with an image store.
    await engine.close();
    const e2 = new Engine(
      loadConfig({ stateDir: dir, imageDir: join(dir, 'images'), poolSize: 0 }, {}),
      new Map(),
      { accel: 'tcg', reason: 'test' },
      () => {},
      { hypervisor: vmm.hypervisor, guest: vmm.guest, runAs: null, images: image },
    );
    await e2.start();
    const box = await e2.createBox(alice, {
      image: 'debian:bookworm',
      cpu: 1,
      memoryMb: 256,
      diskSizeGb: 1,
      network: false,
      env: null,
      volumes: null,
    });
    assert.equal(box.status, 'running');
    await rejects(e2.removeBox(alice, box.id, false), 'BOX_RUNNING');
    assert.equal((await e2.stopBox(alice, box.id)).status, 'stopped');
    assert.equal(vmm.running().length, 0);
    assert.ok(existsSync(join(dir, 'run', box.id, 'disk.qcow2')), 'a stopped box keeps its disk');
    await rejects(e2.suspend(alice, box.id), 'MACHINE_NOT_FOUND');
    assert.equal((await e2.startBox(alice, box.id)).status, 'running');
    vmm.crash(box.id);
    for (let i = 0; i < 100 && e2.getBox(alice, box.id).status !== 'stopped'; i++)
      await new Promise((r) => setTimeout(r, 20));
    assert.equal(e2.getBox(alice, box.id).status, 'stopped');
    assert.ok(existsSync(join(dir, 'run', box.id, 'disk.qcow2')), 'a failed box keeps its disk');
    await e2.removeBox(alice, box.id, false);
    assert.ok(!existsSync(join(dir, 'run', box.id)));
    await e2.close();
  });

  test('a restarted daemon adopts running and paused machines and ends what was cut mid-way', async () => {
    const r = await rig();
    const { engine, vmm, dir, alice } = r;
    const running = await engine.create(alice, { template: 'python' });
    const paused = await engine.create(alice, { template: 'python' });
    await engine.pause(alice, paused.id);
    const suspended = await engine.create(alice, { template: 'python' });
    await engine.suspend(alice, suspended.id);
    const dies = await engine.create(alice, { template: 'python' });
    const branching = await engine.create(alice, { template: 'python' });
    await engine.close();
    // While the daemon is down: one QEMU dies; rows are left mid-flow as a kill -9 would leave them.
    vmm.crash(dies.id);
    // Killed mid-branch: the source's vCPUs were stopped while its state was written.
    for (const v of vmm.running()) if (v.id === branching.id) v.status = 'paused';
    const store = new Store(join(dir, 'hutch.db'));
    const half = (id: string, state: MachineState, pid: number | null): void => {
      const base = store.get(running.id) as MachineRow;
      mkdirSync(join(dir, 'run', id), { recursive: true });
      store.insertMachine({ ...base, id, name: null, state, pid, run_dir: join(dir, 'run', id) }, () => {});
    };
    // Mid-create: a QEMU was launched, the boot never finished.
    const launched = vmm.hypervisor.launch({
      ...vmm.running()[0]!.spec,
      id: 'm-0000c0de',
      runDir: join(dir, 'run', 'm-0000c0de'),
    });
    half('m-0000c0de', 'starting', launched);
    // Mid-destroy, QEMU already gone.
    half('m-0000dead', 'destroying', null);
    // Mid-suspend, state file not complete: the source carries on.
    const cut = vmm.hypervisor.launch({
      ...vmm.running()[0]!.spec,
      id: 'm-00000cut',
      runDir: join(dir, 'run', 'm-00000cut'),
    });
    half('m-00000cut', 'suspending', cut);
    writeFileSync(join(dir, 'run', 'm-00000cut', 'suspend.state.partial'), 'half');
    store.close();

    const r2 = await rig({ dir, vmm });
    const e = r2.engine;
    assert.equal(e.get(alice, running.id).status, 'running');
    assert.equal(
      (await e.exec(alice, running.id, { argv: ['echo', 'adopted'] })).stdout.toJSON(),
      'echo adopted',
    );
    assert.equal(e.get(alice, paused.id).status, 'paused');
    assert.equal((await e.resume(alice, paused.id)).status, 'running');
    assert.equal(e.get(alice, suspended.id).status, 'suspended');
    assert.equal(e.get(alice, branching.id).status, 'running');
    assert.equal((await e.exec(alice, branching.id, { argv: ['echo', 'on'] })).stdout.toJSON(), 'echo on');
    assert.equal(e.get(alice, dies.id).status, 'failed');
    assert.match(e.get(alice, dies.id).error ?? '', /qemu exited while the daemon was down/);
    await rejects(async () => e.get(alice, 'm-0000c0de'), 'MACHINE_NOT_FOUND');
    await rejects(async () => e.get(alice, 'm-0000dead'), 'MACHINE_NOT_FOUND');
    assert.equal(e.get(alice, 'm-00000cut').status, 'running');
    assert.ok(!existsSync(join(dir, 'run', 'm-00000cut', 'suspend.state.partial')));
    // Only the machines that run now have a QEMU; no run dir without a row.
    const ids = new Set(e.list(alice).map((m) => m.id));
    for (const v of vmm.running()) assert.ok(ids.has(v.id), `orphan qemu ${v.id}`);
    for (const d of readdirSync(join(dir, 'run'))) assert.ok(ids.has(d), `orphan run dir ${d}`);
    await e.close();
  });

  test('template snapshots are taken through the engine; clones copy or map their RAM', async () => {
    for (const mode of ['copy', 'map'] as const) {
      const dir = mkdtempSync(join(tmpdir(), 'hutch-engine-'));
      roots.push(dir);
      const vmm = new FakeVmm();
      const { engine, alice } = await rig({ dir, vmm, env: { HUTCH_CLONE_MEMORY: mode } });
      engine.prepareSnapshots();
      for (let i = 0; i < 100 && engine.health().snapshots.python !== 'ready'; i++)
        await new Promise((r) => setTimeout(r, 10));
      assert.equal(engine.health().snapshots.python, 'ready');
      assert.deepEqual(vmm.running(), [], 'the snapshot VM is gone once the snapshot is stored');
      const snapVm = [...vmm.vms.values()].find((v) => v.id.startsWith('s-'));
      assert.match(snapVm?.spec.cmdline ?? '', /console=ttyS0/, "booted with the machines' command line");
      const m = await engine.create(alice, { template: 'python', mode: 'snapshot' });
      assert.equal(m.mode, 'snapshot');
      assert.deepEqual(
        vmm.ramFiles(),
        mode === 'copy' ? [`${m.id}.ram`] : [],
        `${mode}: the clone's own RAM`,
      );
      // Branch works either way: from a file copy (copy) or from the RAM stream (map).
      const clone = await engine.branch(alice, m.id, {});
      assert.ok(vmm.ramFiles().includes(`${clone.id}.ram`), 'a branch always gets a RAM file of its own');
      await engine.close();
    }
  });

  test('the one way in: actions bound to a caller leave an audit line for what changes something', async () => {
    const { engine, logs, alice } = await rig();
    const act = actionsFor(engine, alice, (level, msg, fields = {}) => logs.push({ level, msg, fields }));
    const m = await act.create({ template: 'python' });
    act.list();
    await assert.rejects(act.pause('m-nothere'));
    const audit = logs.filter((l) => l.msg === 'audit');
    assert.deepEqual(
      audit.map((l) => [l.fields.action, l.fields.outcome, l.fields.user]),
      [
        ['create', 'ok', 'alice'],
        ['pause', 'error', 'alice'],
      ],
    );
    assert.equal(audit[0]?.fields.id, m.id);
    assert.equal(audit[1]?.fields.code, 'MACHINE_NOT_FOUND');
    await engine.close();
  });
});

/** An engine with an image store (boxes), over `dir` (a restart: the same dir and hypervisor). */
async function boxRig(shared?: { dir: string; vmm: FakeVmm }): Promise<Rig & { volumeRoot: string }> {
  const dir = shared?.dir ?? mkdtempSync(join(tmpdir(), 'hutch-engine-'));
  if (!shared) roots.push(dir);
  const imageDir = join(dir, 'images');
  mkdirSync(imageDir, { recursive: true });
  writeFileSync(join(imageDir, 'vmlinux'), 'kernel');
  writeFileSync(join(imageDir, 'rootfs.img'), Buffer.alloc(1024 * 1024));
  const volumeRoot = join(dir, 'shared');
  mkdirSync(volumeRoot, { recursive: true });
  const images = {
    resolve: async (ref: string) => ({
      name: 'debian',
      hash: 'img1',
      kernel: join(imageDir, 'vmlinux'),
      rootfs: join(imageDir, 'rootfs.img'),
      cmdline: 'console=ttyS0',
      kernelHz: 100,
      builtAt: '',
      buildSeconds: 0,
      ref,
      digest: 'sha256:1',
      env: [],
      workdir: null,
    }),
  };
  const vmm = shared?.vmm ?? new FakeVmm();
  const logs: Rig['logs'] = [];
  const engine = new Engine(
    loadConfig({ stateDir: dir, imageDir, poolSize: 0, maxMachines: 8, volumeRoots: [volumeRoot] }, {}),
    new Map(),
    { accel: 'tcg', reason: 'test' },
    (level, msg, fields = {}) => logs.push({ level, msg, fields }),
    { hypervisor: vmm.hypervisor, guest: vmm.guest, runAs: null, images },
  );
  await engine.start();
  return {
    engine,
    vmm,
    dir,
    logs,
    alice: localPrincipal('alice'),
    volumeRoot,
    reopen: async () => {
      await engine.close();
      return boxRig({ dir, vmm });
    },
  };
}

const small = { image: 'debian:bookworm', cpu: 1, memoryMb: 256, diskSizeGb: 1 };

async function boxExec(engine: Engine, p: Principal, id: string, argv: string[]): Promise<string> {
  const ops = await engine.openBoxSession(p, id);
  try {
    return (await ops.execBuffered({ argv }, { maxOutputBytes: 1 << 20 })).stdout.concat().toString('utf8');
  } finally {
    ops.release();
  }
}

async function until(what: string, cond: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !cond(); i++) await new Promise((r) => setTimeout(r, 25));
  assert.ok(cond(), what);
}

describe('boxes with the machines capabilities (fake hypervisor)', () => {
  test('fork: a live clone with its own id, name and disk copy; refusals say why', async () => {
    const { engine, vmm, dir, alice, volumeRoot } = await boxRig();
    const src = await engine.createBox(alice, { ...small, name: 'src', autoSuspendSeconds: 120 });
    await boxExec(engine, alice, src.id, ['write', 'k', 'v1']);
    const clone = await engine.forkBox(alice, 'src', { name: 'clone' });
    assert.equal(clone.status, 'running');
    assert.equal(clone.forked_from, src.id);
    assert.match(clone.id, /^box_/);
    assert.equal(clone.auto_suspend_seconds, 120, 'the clone inherits the auto-suspend timeout');
    assert.equal(engine.getBox(alice, 'clone').forked_from, src.id);
    assert.equal(await boxExec(engine, alice, clone.id, ['read', 'k']), 'v1');
    assert.equal(engine.getBox(alice, src.id).status, 'running');
    assert.ok(existsSync(join(dir, 'run', clone.id, 'disk.qcow2')), 'the clone has its own disk');
    assert.equal(vmm.running().length, 2);
    await rejects(engine.forkBox(alice, src.id, { name: 'clone' }), 'NAME_TAKEN');
    await rejects(engine.forkBox(localPrincipal('bob'), src.id, {}), 'BOX_NOT_FOUND');
    const limited: Principal = { ...alice, quota: { maxActive: 2 } };
    await rejects(engine.forkBox(limited, src.id, {}), 'RESOURCE_EXHAUSTED');
    const withVolume = await engine.createBox(alice, {
      ...small,
      volumes: [{ host_path: volumeRoot, guest_path: '/mnt/shared', readonly: false }],
    });
    await assert.rejects(
      engine.forkBox(alice, withVolume.id, {}),
      (e: unknown) =>
        e instanceof HutchError && e.code === 'NOT_SUPPORTED' && /host directories/.test(e.message),
    );
    await rejects(engine.suspendBox(alice, withVolume.id), 'NOT_SUPPORTED');
    await engine.stopBox(alice, src.id);
    await rejects(engine.forkBox(alice, src.id, {}), 'BOX_NOT_RUNNING');
    await engine.close();
  });

  test('suspend and resume with timings; use wakes it; stop of a suspended box wakes it to power off', async () => {
    const { engine, vmm, dir, alice } = await boxRig();
    const box = await engine.createBox(alice, small);
    await boxExec(engine, alice, box.id, ['write', 'f', 'kept']);
    const s = await engine.suspendBox(alice, box.id);
    assert.equal(s.status, 'suspended');
    assert.ok(s.suspend_us > 0);
    assert.equal(vmm.running().length, 0);
    assert.ok(existsSync(join(dir, 'run', box.id, 'suspend.state')));
    const r = await engine.resumeBox(alice, box.id);
    assert.equal(r.status, 'running');
    assert.ok(r.resume_us >= 0);
    assert.equal(await boxExec(engine, alice, box.id, ['read', 'f']), 'kept');
    await engine.suspendBox(alice, box.id);
    assert.equal(await boxExec(engine, alice, box.id, ['read', 'f']), 'kept', 'exec wakes a suspended box');
    assert.equal(engine.getBox(alice, box.id).status, 'running');
    await engine.suspendBox(alice, box.id);
    assert.equal((await engine.startBox(alice, box.id)).status, 'running', 'start wakes a suspended box');
    assert.equal(await boxExec(engine, alice, box.id, ['read', 'f']), 'kept');
    // A fork of a suspended box wakes the source first.
    await engine.suspendBox(alice, box.id);
    const clone = await engine.forkBox(alice, box.id, {});
    assert.equal(await boxExec(engine, alice, clone.id, ['read', 'f']), 'kept');
    await engine.suspendBox(alice, box.id);
    const stopped = await engine.stopBox(alice, box.id);
    assert.equal(stopped.status, 'stopped');
    assert.ok(!existsSync(join(dir, 'run', box.id, 'suspend.state')), 'the saved state is gone');
    assert.ok(existsSync(join(dir, 'run', box.id, 'disk.qcow2')), 'the disk stays');
    await rejects(engine.resumeBox(alice, box.id), 'BOX_NOT_RUNNING');
    await engine.close();
  });

  test('reboot keeps id and disk, boots cold, runs cmd again; restart policy is checked', async () => {
    const { engine, vmm, logs, alice } = await boxRig();
    await rejects(
      engine.createBox(alice, { ...small, cmd: ['x'], restartPolicy: 'sometimes' }),
      'INVALID_ARGUMENT',
    );
    const box = await engine.createBox(alice, { ...small, cmd: ['sleep', '1000'], restartPolicy: 'always' });
    assert.deepEqual(box.cmd, ['sleep', '1000']);
    assert.equal(box.restart_policy, 'always');
    const started = () => logs.filter((l) => l.msg === 'box cmd started' && l.fields.id === box.id).length;
    assert.equal(started(), 1);
    await boxExec(engine, alice, box.id, ['write', 'mem', 'x']);
    const pid = vmm.running()[0]?.pid;
    const r = await engine.rebootBox(alice, box.id);
    assert.equal(r.status, 'running');
    assert.equal(r.id, box.id);
    assert.notEqual(vmm.running()[0]?.pid, pid, 'a new VM');
    assert.equal(await boxExec(engine, alice, box.id, ['read', 'mem']), '', 'memory is gone after a reboot');
    assert.equal(started(), 2, 'cmd runs after every boot');
    await engine.suspendBox(alice, box.id);
    assert.equal((await engine.rebootBox(alice, box.id)).status, 'running', 'a suspended box reboots');
    await engine.close();
  });

  test('timers: auto-suspend after idle (wakes on use), auto-destroy from the call', async () => {
    const { engine, vmm, alice } = await boxRig();
    const box = await engine.createBox(alice, { ...small, autoDestroySeconds: 3600 });
    assert.equal(box.auto_destroy_seconds, 3600);
    assert.ok(box.expires_at);
    assert.equal(box.auto_suspend_seconds, 0);
    await rejects(
      async () => engine.setBoxTimers(alice, box.id, { autoSuspendSeconds: -1 }),
      'INVALID_ARGUMENT',
    );
    const v = engine.setBoxTimers(alice, box.id, { autoSuspendSeconds: 1 });
    assert.equal(v.auto_suspend_seconds, 1);
    assert.equal(v.auto_destroy_seconds, 3600, 'what is absent stays');
    await until('auto-suspended', () => engine.getBox(alice, box.id).status === 'suspended');
    assert.equal(vmm.running().length, 0);
    assert.equal(await boxExec(engine, alice, box.id, ['echo', 'hi']), 'echo hi');
    engine.setBoxTimers(alice, box.id, { autoSuspendSeconds: 0, autoDestroySeconds: 1 });
    await until('auto-destroyed', () => engine.listBoxes(alice).length === 0);
    assert.equal(vmm.running().length, 0);
    // A stopped box is destroyed too.
    const b2 = await engine.createBox(alice, small);
    await engine.stopBox(alice, b2.id);
    assert.equal(engine.setBoxTimers(alice, b2.id, { autoDestroySeconds: 1 }).auto_destroy_seconds, 1);
    await until('stopped box auto-destroyed', () => engine.listBoxes(alice).length === 0);
    await engine.close();
  });

  test('templates: per user, ready once snapshotted; boxes from them restore; delete keeps boxes', async () => {
    const { engine, alice } = await boxRig();
    const bob = localPrincipal('bob');
    const t = await engine.createTemplate(alice, {
      name: 'web',
      image: 'debian:bookworm',
      cpu: 1,
      memoryMb: 256,
      diskSizeGb: 8,
    });
    assert.equal(t.status, 'ready', t.error ?? '');
    assert.match(t.id, /^tpl-[0-9a-f]{12}$/);
    await rejects(
      engine.createTemplate(alice, { name: 'web', image: 'x', cpu: 1, memoryMb: 256, diskSizeGb: 8 }),
      'NAME_TAKEN',
    );
    assert.deepEqual(
      engine.listTemplates(alice).map((x) => x.name),
      ['web'],
    );
    assert.deepEqual(engine.listTemplates(bob), []);
    await rejects(async () => engine.getTemplate(bob, t.id), 'TEMPLATE_NOT_FOUND');
    await rejects(engine.createBox(bob, { template: t.id }), 'TEMPLATE_NOT_FOUND');
    const box = await engine.createBox(alice, { template: 'web', cmd: ['true'] });
    assert.equal(box.mode, 'snapshot', 'restored from the template snapshot');
    assert.equal(box.template, t.id);
    assert.equal(box.cpu, 1);
    assert.equal(box.memory_mb, 256);
    assert.equal(box.disk_size_gb, 8);
    engine.deleteTemplate(alice, 'web');
    await rejects(async () => engine.getTemplate(alice, t.id), 'TEMPLATE_NOT_FOUND');
    assert.equal(engine.getBox(alice, box.id).status, 'running');
    // A fork of a box restored from a snapshot restores with the same devices.
    const clone = await engine.forkBox(alice, box.id, {});
    assert.equal(clone.status, 'running');
    await engine.suspendBox(alice, clone.id);
    assert.equal((await engine.resumeBox(alice, clone.id)).status, 'running');
    await engine.close();
  });

  test('a restarted daemon keeps suspended boxes suspended and ends a fork or a suspend cut mid-way', async () => {
    const r = await boxRig();
    const { engine, vmm, dir, alice } = r;
    const suspended = await engine.createBox(alice, small);
    await boxExec(engine, alice, suspended.id, ['write', 'f', 'kept']);
    await engine.suspendBox(alice, suspended.id);
    const source = await engine.createBox(alice, small);
    await engine.close();
    // Killed mid-fork: the source's vCPUs stopped, the clone's row starting and never run.
    for (const v of vmm.running()) if (v.id === source.id) v.status = 'paused';
    const store = new Store(join(dir, 'hutch.db'));
    const base = store.get(source.id) as MachineRow;
    const cloneId = 'box_00000000c10e';
    mkdirSync(join(dir, 'run', cloneId), { recursive: true });
    store.insertMachine(
      {
        ...base,
        id: cloneId,
        name: null,
        state: 'starting',
        pid: null,
        started_at: null,
        run_dir: join(dir, 'run', cloneId),
      },
      () => {},
    );
    store.close();
    const r2 = await boxRig({ dir, vmm });
    const e = r2.engine;
    assert.equal(e.getBox(alice, suspended.id).status, 'suspended');
    assert.equal(await boxExec(e, alice, suspended.id, ['read', 'f']), 'kept');
    assert.equal(e.getBox(alice, source.id).status, 'running');
    assert.equal(await boxExec(e, alice, source.id, ['echo', 'on']), 'echo on');
    await rejects(async () => e.getBox(alice, cloneId), 'BOX_NOT_FOUND');
    assert.ok(!existsSync(join(dir, 'run', cloneId)));
    await e.close();
  });
});
