import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { processAlive } from '../process-alive.js';
import { runPaths } from '../vmm/qemu.js';
import { snapshotBuilderOf } from './flows/snapshot.js';
import { recoveryOf } from './lifecycle.js';
import type { Machine } from './machine.js';
import type { Runtime } from './runtime.js';
import type { MachineRow } from './store.js';
import { activeStates } from './store.js';

/**
 * What a restarted daemon does with what the last one left: every row goes through the
 * lifecycle's recovery table (engine/lifecycle.ts `recoveryOf`) and its resources are
 * registered on its machine's cleanup stack, so that whatever it decides ends them the same
 * way as any other end. Then what no row owns is removed: QEMUs, run dirs and cgroups.
 */
export async function recover(rt: Runtime): Promise<void> {
  const known = new Set<string>();
  for (const row of rt.store.list()) {
    known.add(row.id);
    const m = rt.machine(row);
    await m.lock.run(() => recoverOne(rt, m, row));
  }
  const { hv, log, runRoot } = rt.d;
  // QEMU processes of ours that the store does not know: a crash between launch and insert,
  // or a snapshot whose builder died mid-way (its VM's name carries the builder's pid).
  for (const q of hv.list()) {
    const builder = snapshotBuilderOf(q.id);
    if (builder !== undefined && builder !== process.pid && !processAlive(builder)) {
      log('warn', 'killing orphan snapshot qemu', { pid: q.pid });
      await hv.kill(q.pid);
      continue;
    }
    if (!q.argv.some((a) => a.includes(runRoot))) continue;
    const row = rt.store.get(q.id);
    if (!row || !activeStates.includes(row.state)) {
      log('warn', 'killing orphan qemu', { pid: q.pid, id: q.id });
      await hv.kill(q.pid);
    }
  }
  for (const dir of readdirSync(runRoot))
    if (!rt.store.get(dir)) rmSync(join(runRoot, dir), { recursive: true, force: true });
  // RAM files of machines not adopted above (their QEMU is gone): nothing maps them any more.
  for (const id of hv.ram.sweep((id) => rt.d.registry.get(id)?.vm !== undefined))
    log('info', 'removed the memory file of a machine that is gone', { id });
  // cgroups are named by machine id, which is unique across daemons: one with no live QEMU
  // and no running row anywhere here is debris from a crash.
  const liveIds = new Set(hv.list().map((q) => q.id));
  for (const name of hv.listCgroups()) if (!liveIds.has(name)) await hv.releaseCgroup(name, 100);
}

async function recoverOne(rt: Runtime, m: Machine, row: MachineRow): Promise<void> {
  const { hv, log } = rt.d;
  const alive = row.pid !== null && hv.isVmOf(row.pid, row.id);
  const stateFile = join(row.run_dir, 'suspend.state');
  // A state file still being written when the daemon died is never complete: drop it.
  for (const partial of [`${stateFile}.partial`, join(row.run_dir, 'branch.state.partial')])
    rmSync(partial, { force: true });
  // Its memory is copied before the state is written: without the state it is debris.
  if (!existsSync(stateFile)) hv.ram.remove(join(row.run_dir, 'suspend.ram'));
  const step = recoveryOf(row, { alive, saved: existsSync(stateFile) });
  // Failed machines already gave everything back but their row.
  if (row.state !== 'failed') rt.own(m, row.kind);
  if (alive && row.pid !== null) rt.adopt(m, row.pid);
  switch (step) {
    case 'adopt-running':
      try {
        // Its vCPUs may be stopped though its row says running: a daemon killed in the middle of
        // a branch or a pause (the source is stopped while its state is written), or QEMU stopped
        // it on a full host disk (werror=enospc). The user was never told it stopped: continue it.
        const qmp = await rt.qmpOf(m);
        const { status } = await qmp.execute<{ status: string }>('query-status');
        if (status === 'paused' || status === 'io-error') {
          await qmp.execute('cont');
          log('info', 'continued a machine left stopped mid-operation', { id: row.id, status });
        }
        const agent = await rt.connectAgent(m);
        if (m.vm) m.vm.agent = agent;
        rt.watchAgent(m, agent);
        rt.armTtl(row);
        log('info', 'adopted running machine', { id: row.id, pid: row.pid });
      } catch (e) {
        log('warn', 'running machine does not answer; destroying it', {
          id: row.id,
          error: (e as Error).message,
        });
        await rt.end(m, 'failed', `agent did not answer after daemon restart: ${(e as Error).message}`);
      }
      return;
    case 'adopt-paused':
      // A paused guest cannot answer its agent; the connection is made on resume.
      rt.armTtl(row);
      log('info', 'adopted paused machine', { id: row.id, pid: row.pid });
      return;
    case 'finish-suspend':
      // The snapshot was complete (it is renamed into place last): finish the suspend.
      if (row.pid !== null) await hv.stop(row.pid, runPaths(row.run_dir).qmp);
      await rt.halt(m);
      rt.transition(row.id, 'suspended', { pid: null });
      rt.armTtl(row);
      return;
    case 'undo-suspend':
      // Crashed mid-snapshot: the source carries on as it was.
      try {
        await (await rt.qmpOf(m)).execute('cont');
        const agent = await rt.connectAgent(m);
        if (m.vm) m.vm.agent = agent;
        rt.watchAgent(m, agent);
        rt.transition(row.id, 'suspend-undone');
        rt.armTtl(row);
      } catch (e) {
        await rt.end(m, 'failed', `interrupted suspend could not be undone: ${(e as Error).message}`);
      }
      return;
    case 'back-to-suspended':
      await rt.halt(m);
      rt.transition(row.id, row.state === 'resuming' ? 'wake-failed' : 'suspended', { pid: null });
      rt.armTtl(row);
      return;
    case 'keep':
      rt.armTtl(row);
      return;
    case 'box-stopped':
      await rt.halt(m);
      if (row.state !== 'stopped')
        rt.transition(row.id, 'stopped', { pid: null, stopped_at: new Date().toISOString() });
      return;
    case 'fail':
      await rt.end(
        m,
        'failed',
        row.state === 'running' || row.state === 'paused'
          ? 'qemu exited while the daemon was down'
          : 'the machine was lost while it was being suspended',
      );
      return;
    case 'remove':
      await rt.end(m, 'deleted');
      return;
  }
}
