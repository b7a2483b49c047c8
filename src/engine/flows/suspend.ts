import { existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { HutchError, orStorageFull } from '../../errors.js';
import { runPaths } from '../../vmm/qemu.js';
import { checkTransition } from '../lifecycle.js';
import type { Machine } from '../machine.js';
import type { MachineRow } from '../store.js';
import type { FlowContext } from './context.js';
import { notRunning, refuseIfVolumes, restoreTarget } from './restore-target.js';

/** Where a suspended machine's state is kept (in its run dir, beside its disk). */
export function suspendStateFile(row: Pick<MachineRow, 'run_dir'>): string {
  return join(row.run_dir, 'suspend.state');
}

/** Its RAM, beside the state (absent for a machine suspended before RAM files: RAM is in the state). */
export function suspendRamFile(row: Pick<MachineRow, 'run_dir'>): string {
  return join(row.run_dir, 'suspend.ram');
}

/** Stops the vCPUs; memory and everything else stays. Callers hold the machine's lock. */
export async function pauseMachine(cx: FlowContext, m: Machine): Promise<{ row: MachineRow; us: number }> {
  const row = cx.rt.store.get(m.id) as MachineRow;
  if (row.state === 'paused') return { row, us: 0 };
  checkTransition(row, 'pause');
  const qmp = await cx.rt.qmpOf(m);
  const t0 = performance.now();
  await qmp.execute('stop');
  const us = Math.round((performance.now() - t0) * 1000);
  return { row: cx.rt.transition(m.id, 'pause'), us };
}

/** Continues a paused machine, or brings a suspended one back from disk. Callers hold the lock. */
export async function resumeMachine(cx: FlowContext, m: Machine): Promise<{ row: MachineRow; us: number }> {
  const { rt } = cx;
  const row = rt.store.get(m.id) as MachineRow;
  if (row.state === 'running') return { row, us: 0 };
  if (row.state === 'suspended') {
    const us = await resumeFromDisk(cx, m, row);
    m.touch();
    return { row: rt.store.get(m.id) as MachineRow, us };
  }
  checkTransition(row, 'continue');
  const qmp = await rt.qmpOf(m);
  const t0 = performance.now();
  await qmp.execute('cont');
  const us = Math.round((performance.now() - t0) * 1000);
  rt.transition(m.id, 'continue');
  const vm = m.vm;
  if (vm && !vm.agent) {
    // Adopted while paused: the agent can answer only now.
    vm.agent = await rt.connectAgent(m);
    rt.watchAgent(m, vm.agent);
  }
  m.touch();
  return { row: rt.store.get(m.id) as MachineRow, us };
}

/**
 * Writes the whole machine or box (RAM, devices; the disk is already a file) to its run dir and
 * ends its QEMU, freeing the memory. Open execs end with a clear error; files and background
 * processes (detached from their exec: the agent ends an exec's processes with its stream) come
 * back on resume. Callers hold the lock.
 */
export async function suspendMachine(cx: FlowContext, m: Machine): Promise<{ row: MachineRow; us: number }> {
  const { rt } = cx;
  const row = rt.store.get(m.id) as MachineRow;
  if (row.state === 'suspended') return { row, us: 0 };
  refuseIfVolumes(row, 'suspended');
  const vm = m.vm;
  rt.transition(m.id, 'suspend');
  if (!vm) {
    rt.transition(m.id, 'suspend-undone');
    throw notRunning(row, `cannot suspend ${row.kind} ${m.id}: it has no VM`);
  }
  const t0 = performance.now();
  const stateFile = suspendStateFile(row);
  try {
    const qmp = await rt.qmpOf(m);
    // The agent sees the host leave and ends the open exec streams before the freeze, so
    // the machine resumes with no half-finished stream.
    vm.agent?.close();
    vm.agent = undefined;
    await new Promise((r) => setTimeout(r, 50));
    await qmp.execute('stop');
    const bytesPerSecond = cx.config.migrationMaxMBps * 1e6;
    await rt.d.hv.saveMachine(qmp, runPaths(row.run_dir).migDir, {
      state: stateFile,
      memory: rt.ramCopy(m, suspendRamFile(row), {
        durable: true,
        bytesPerSecond,
        stillWanted: () => rt.d.hv.isAlive(vm.pid),
      }),
      maxBytesPerSecond: bytesPerSecond,
      durable: true,
    });
  } catch (e) {
    rmSync(stateFile, { force: true });
    rt.d.hv.ram.remove(suspendRamFile(row));
    if (!rt.d.hv.isAlive(vm.pid)) {
      await rt.end(m, 'failed', 'qemu exited during suspend');
      throw notRunning(row, `suspend of ${m.id} failed: qemu exited during suspend`);
    }
    // The source keeps running with everything it had: a failed suspend changes nothing.
    await (await rt.qmpOf(m)).execute('cont').catch(() => {});
    vm.agent = await rt.connectAgent(m).catch(() => undefined);
    if (vm.agent) rt.watchAgent(m, vm.agent);
    rt.transition(m.id, 'suspend-undone');
    throw orStorageFull(
      e,
      'INTERNAL',
      `suspend of ${m.id} failed, ${row.kind} left running: ${(e as Error).message}`,
    );
  }
  rt.transition(m.id, 'suspended', { pid: null });
  await rt.halt(m);
  const us = Math.round((performance.now() - t0) * 1000);
  rt.d.log('info', `${row.kind} suspended`, { id: m.id, suspend_us: us });
  return { row: rt.store.get(m.id) as MachineRow, us };
}

async function resumeFromDisk(cx: FlowContext, m: Machine, row: MachineRow): Promise<number> {
  const { rt } = cx;
  const stateFile = suspendStateFile(row);
  if (!existsSync(stateFile))
    throw notRunning(row, `${row.kind} ${row.id} cannot be resumed: its saved state is gone`);
  const { image, devices } = restoreTarget(cx, row);
  rt.transition(m.id, 'wake');
  // Saved since machines have RAM files of their own; without it, RAM is in the state stream.
  const ramFile = suspendRamFile(row);
  const withRam = existsSync(ramFile);
  try {
    rt.own(m, row.kind);
    const { vm, restoredUs } = await rt.restoreInto(m, row, image, stateFile, {
      ...(withRam ? { memoryFrom: ramFile } : {}),
      ignoreShared: withRam,
      ...devices,
    });
    // The guest clock stood still while the machine was on disk.
    await vm.agent?.configure({ timeNs: BigInt(Date.now()) * 1_000_000n }, 10_000);
    if (vm.agent) rt.watchAgent(m, vm.agent);
    rt.transition(m.id, 'woke');
    rmSync(stateFile, { force: true });
    rt.d.hv.ram.remove(ramFile);
    rt.d.log('info', `${row.kind} resumed`, { id: row.id, resume_us: restoredUs });
    return restoredUs;
  } catch (e) {
    // Back to suspended, state file untouched: the machine can be resumed again.
    await rt.halt(m);
    rt.transition(m.id, 'wake-failed', { pid: null });
    throw new HutchError('INTERNAL', `resume of ${row.id} failed (still suspended): ${(e as Error).message}`);
  }
}
