// Boxes with the machines' capabilities, on real VMs: fork, suspend/resume, reboot, auto-suspend,
// auto-destroy, a boot `cmd` with its restart policy, and user templates. The daemon runs in
// this process (src/daemon.ts, as `hutch serve` starts it) and the test calls the actions the
// way an adapter does (core/dispatch.ts): the gRPC API that serves them is another helper's.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { type Actions, actionsFor } from '../../src/core/dispatch.js';
import { localPrincipal } from '../../src/core/principal.js';
import { type Daemon, startDaemon } from '../../src/daemon.js';
import { memoryDirOf } from '../../src/vmm/memory-file.js';
import { imageDir, qemusOf, until, waitFor } from '../helpers/daemon.js';

const size = { image: 'debian:bookworm', cpu: 1, memoryMb: 256, diskSizeGb: 8 };

let daemon: Daemon;
let act: Actions;
let stateDir: string;
const logs: { level: string; msg: string; fields: Record<string, unknown> }[] = [];
const timings: Record<string, number> = {};

async function sh(id: string, script: string): Promise<{ code: number | null; out: string }> {
  const ops = await act.openBoxSession(id);
  try {
    const r = await ops.execBuffered({ argv: ['sh', '-c', script] }, { maxOutputBytes: 1 << 20 });
    return { code: r.exitCode, out: r.stdout.concat().toString('utf8').trim() };
  } finally {
    ops.release();
  }
}

const consoleOf = (id: string): string => {
  try {
    return readFileSync(join(stateDir, 'run', id, 'console.log'), 'utf8');
  } catch {
    return '';
  }
};

/**
 * The background process of `pidFile` runs: its pid is this `sleep 100001`, not a reused one. A
 * boot is deterministic enough that after a reboot the pid may be the boot cmd's `sleep 100000`
 * or this check's own shell (whose command line holds the number): both are told apart.
 */
const aliveCheck = (pidFile: string): string =>
  `p=$(cat ${pidFile}); [ "$(cat /proc/$p/comm 2>/dev/null)" = sleep ] && grep -q 100001 /proc/$p/cmdline && echo alive || echo dead`;

before(async () => {
  stateDir = mkdtempSync(join(tmpdir(), 'hutch-test-'));
  const config = loadConfig(
    { stateDir, imageDir, port: 0, poolSize: 0, cacheGcOnStart: false, boxesSocket: 'off' },
    {},
  );
  const log = (level: string, msg: string, fields: Record<string, unknown> = {}): void => {
    logs.push({ level, msg, fields });
    if (level !== 'info') process.stderr.write(`${JSON.stringify({ level, msg, ...fields })}\n`);
  };
  daemon = await startDaemon(config, { log });
  act = actionsFor(daemon.engine, localPrincipal('tester'), log);
});

after(async () => {
  for (const b of act.listBoxes()) await act.removeBox(b.id, true);
  await daemon.close();
  const left = qemusOf(stateDir);
  for (const pid of left) process.kill(pid, 'SIGKILL');
  rmSync(stateDir, { recursive: true, force: true });
  rmSync(memoryDirOf(stateDir), { recursive: true, force: true });
  process.stderr.write(`box-lifecycle timings (ms): ${JSON.stringify(timings)}\n`);
  assert.deepEqual(left, [], 'no QEMU left');
});

describe('box lifecycle on real VMs', { timeout: 900_000 }, () => {
  test('cmd runs in the background after boot, its output on the console', async () => {
    const box = await act.createBox({
      ...size,
      name: 'src',
      cmd: [
        'sh',
        '-c',
        'echo hutch-cmd-ran; cat /proc/sys/kernel/random/boot_id >> /root/boots; sleep 100000',
      ],
    });
    assert.equal(box.status, 'running');
    assert.deepEqual(box.cmd?.[0], 'sh');
    assert.equal(box.restart_policy, 'no');
    await until('cmd output on the console', () => consoleOf(box.id).includes('hutch-cmd-ran'), 60_000);
    assert.equal((await sh('src', 'wc -l < /root/boots')).out, '1');
  });

  test('fork: a live clone keeps the background process and files; its writes stay its own', async () => {
    await sh(
      'src',
      `echo before > /root/f; setsid sleep 100001 </dev/null >/dev/null 2>&1 & echo $! > /root/bg.pid`,
    );
    assert.equal((await sh('src', aliveCheck('/root/bg.pid'))).out, 'alive');
    const t0 = performance.now();
    const clone = await act.forkBox('src', { name: 'src-clone' });
    const first = await sh(clone.id, 'cat /root/f');
    timings.fork_to_first_exec = Math.round(performance.now() - t0);
    timings.fork_boot = clone.boot_ms;
    assert.equal(first.out, 'before');
    assert.equal(clone.forked_from, act.getBox('src').id);
    assert.equal(clone.name, 'src-clone');
    assert.equal(
      (await sh(clone.id, aliveCheck('/root/bg.pid'))).out,
      'alive',
      'the process runs in the clone',
    );
    await sh(clone.id, 'echo clone > /root/f2; echo changed > /root/f; sync');
    assert.equal(
      (await sh('src', 'cat /root/f')).out,
      'before',
      "the clone's writes do not show in the source",
    );
    assert.equal((await sh('src', 'test -e /root/f2 && echo yes || echo no')).out, 'no');
    assert.equal((await sh('src', aliveCheck('/root/bg.pid'))).out, 'alive', 'the source runs on');
    await assert.rejects(act.forkBox('src', { name: 'src-clone' }), /already exists/);
  });

  test('suspend and resume: a file and a process survive; timings are reported', async () => {
    const s = await act.suspendBox('src-clone');
    assert.equal(s.status, 'suspended');
    assert.ok(s.suspend_us > 0);
    timings.suspend = Math.round(s.suspend_us / 1000);
    const r = await act.resumeBox('src-clone');
    assert.equal(r.status, 'running');
    assert.ok(r.resume_us > 0);
    timings.resume = Math.round(r.resume_us / 1000);
    assert.equal((await sh('src-clone', 'cat /root/f')).out, 'changed');
    assert.equal((await sh('src-clone', aliveCheck('/root/bg.pid'))).out, 'alive');
  });

  test('auto-suspend after idle; exec wakes it', async () => {
    const v = act.setBoxTimers('src-clone', { autoSuspendSeconds: 2 });
    assert.equal(v.auto_suspend_seconds, 2);
    await waitFor(
      'auto-suspend',
      async () => (act.getBox('src-clone').status === 'suspended' ? true : undefined),
      60_000,
    );
    const t0 = performance.now();
    assert.equal((await sh('src-clone', 'cat /root/f2')).out, 'clone');
    timings.wake_on_exec = Math.round(performance.now() - t0);
    act.setBoxTimers('src-clone', { autoSuspendSeconds: 0 });
    assert.equal(act.getBox('src-clone').status, 'running');
    assert.equal((await sh('src-clone', aliveCheck('/root/bg.pid'))).out, 'alive');
  });

  test('reboot: the disk survives, processes do not, cmd runs again', async () => {
    const before = (await sh('src', 'cat /proc/sys/kernel/random/boot_id')).out;
    const t0 = performance.now();
    const r = await act.rebootBox('src');
    timings.reboot = Math.round(performance.now() - t0);
    assert.equal(r.status, 'running');
    assert.equal(r.name, 'src');
    const now = (await sh('src', 'cat /proc/sys/kernel/random/boot_id')).out;
    assert.notEqual(now, before, 'a new boot');
    assert.equal((await sh('src', 'cat /root/f')).out, 'before', 'the disk is kept');
    assert.equal((await sh('src', aliveCheck('/root/bg.pid'))).out, 'dead', 'processes are gone');
    await waitFor(
      'cmd after the reboot',
      async () => ((await sh('src', 'tail -n1 /root/boots')).out === now ? true : undefined),
      60_000,
    );
  });

  test('restart policy on-failure runs cmd again; auto-destroy removes the box', async () => {
    const box = await act.createBox({
      ...size,
      name: 'short',
      cmd: ['sh', '-c', 'echo x >> /root/runs; exit 1'],
      restartPolicy: 'on-failure',
    });
    await waitFor(
      'cmd restarted',
      async () =>
        Number((await sh(box.id, 'wc -l < /root/runs 2>/dev/null || echo 0')).out) >= 2 ? true : undefined,
      60_000,
    );
    assert.match(consoleOf(box.id), /hutch: cmd exited with status 1/);
    const v = act.setBoxTimers('short', { autoDestroySeconds: 2 });
    assert.equal(v.auto_destroy_seconds, 2);
    await until('auto-destroyed', () => !act.listBoxes().some((b) => b.id === box.id), 30_000);
    assert.ok(!existsSync(join(stateDir, 'run', box.id)));
  });

  test('templates: ready once snapshotted; a box from one restores from the snapshot', async () => {
    const t0 = performance.now();
    // A size no other test uses: the template waits for its own snapshot.
    const t = await act.createTemplate({
      name: 'tpl-bookworm',
      image: 'debian:bookworm',
      cpu: 1,
      memoryMb: 272,
      diskSizeGb: 8,
    });
    timings.create_template = Math.round(performance.now() - t0);
    assert.equal(t.status, 'ready', t.error ?? '');
    assert.deepEqual(
      act.listTemplates().map((x) => x.id),
      [t.id],
    );
    const t1 = performance.now();
    const box = await act.createBox({ template: 'tpl-bookworm', name: 'from-tpl' });
    timings.create_from_template = Math.round(performance.now() - t1);
    timings.create_from_template_boot = box.boot_ms ?? -1;
    assert.equal(box.mode, 'snapshot', 'restored from the snapshot');
    assert.equal(box.template, t.id);
    assert.equal(box.memory_mb, 272);
    assert.ok(
      logs.some((l) => l.msg === 'box started' && l.fields.id === box.id && l.fields.mode === 'snapshot'),
    );
    assert.equal((await sh(box.id, 'echo ok')).out, 'ok');
    act.deleteTemplate(t.id);
    assert.deepEqual(act.listTemplates(), []);
    assert.equal(act.getBox(box.id).status, 'running');
  });
});
