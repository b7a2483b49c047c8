import { rmSync } from 'node:fs';
import { HutchError, orStorageFull } from '../../errors.js';
import { boxSpecOf } from '../box-view.js';
import { checkTransition } from '../lifecycle.js';
import type { Machine } from '../machine.js';
import type { MachineRow } from '../store.js';
import { startBoxCmd } from './box-cmd.js';
import type { FlowContext } from './context.js';
import { bootBox } from './create.js';
import { boxImage } from './restore-target.js';
import { resumeMachine, suspendRamFile, suspendStateFile } from './suspend.js';

/**
 * Stops a box: the guest syncs its disks and powers off, so everything it wrote is kept; the
 * VM's memory and processes are gone. Callers hold the box's lock.
 */
export async function stopBox(cx: FlowContext, m: Machine): Promise<MachineRow> {
  const { rt } = cx;
  let row = rt.store.get(m.id) as MachineRow;
  if (row.state === 'stopped') return row;
  if (row.state === 'suspended') row = await wakeToStop(cx, m, row);
  rt.transition(m.id, 'stop');
  const vm = m.vm;
  if (vm) {
    try {
      if (row.state === 'paused') await (await rt.qmpOf(m)).execute('cont');
      // POWEROFF syncs the guest's page cache to the disk; QEMU (-no-reboot) then exits.
      await vm.agent?.poweroff();
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline && rt.d.hv.isAlive(vm.pid)) await new Promise((r) => setTimeout(r, 20));
    } catch (e) {
      rt.d.log('warn', 'box did not power off cleanly; stopping its qemu', {
        id: m.id,
        error: (e as Error).message,
      });
    }
  }
  await rt.halt(m);
  rt.d.execs.failAll(m.id, 'the box was stopped');
  const stopped = rt.transition(m.id, 'stopped', { pid: null, stopped_at: new Date().toISOString() });
  rt.d.log('info', 'box stopped', { id: m.id });
  return stopped;
}

/** Boots a stopped box again, on its own disk (wakes a suspended one). Callers hold the box's lock. */
export async function startBox(
  cx: FlowContext,
  m: Machine,
  quota: Parameters<FlowContext['admission']['update']>[2],
): Promise<MachineRow> {
  const { rt } = cx;
  const t0 = performance.now();
  const row = rt.store.get(m.id) as MachineRow;
  if (row.state === 'running') return row;
  // Start asks for a running box: a suspended one is woken (its processes come back).
  if (row.state === 'suspended') return (await resumeMachine(cx, m)).row;
  // stopped → starting is recorded by the admission, in the transaction that checks the caps.
  const starting = checkTransition(row, 'start');
  const image = boxImage(row);
  // A cold boot has only the volumes it mounts: no placeholder slots (box-view.ts `slots`).
  const spec = JSON.stringify({ ...boxSpecOf(row), slots: false });
  await cx.admission.update(row, { state: starting, error: null, mode: 'cold', spec }, quota);
  try {
    rt.own(m, 'box');
    const booting = rt.store.get(m.id) as MachineRow;
    await bootBox(cx, m, booting, image);
    await startBoxCmd(cx, booting, m.vm?.agent);
    return rt.markRunning(m, Math.round(performance.now() - t0));
  } catch (e) {
    await rt.halt(m);
    rt.transition(m.id, 'stopped', { pid: null, error: (e as Error).message });
    if (e instanceof HutchError) throw e;
    throw orStorageFull(e, 'BOOT_FAILED', `box ${m.id} did not start: ${(e as Error).message}`);
  }
}

/**
 * Stop, then start: a cold boot on the box's own disk, same id, name and disk; its processes
 * (and its saved state, when it was suspended) are gone, its `cmd` runs again. Callers hold
 * the box's lock.
 */
export async function rebootBox(
  cx: FlowContext,
  m: Machine,
  quota: Parameters<FlowContext['admission']['update']>[2],
): Promise<MachineRow> {
  await stopBox(cx, m);
  return startBox(cx, m, quota);
}

/**
 * A suspended box about to be stopped is woken first, so that its guest powers off the usual
 * way and whatever it had not yet written back reaches its disk. When it cannot be woken (its
 * saved state is lost or does not load), the state is dropped: the box stops with its disk as
 * the suspend left it (a completed migration flushed it), like after a power cut.
 */
async function wakeToStop(cx: FlowContext, m: Machine, row: MachineRow): Promise<MachineRow> {
  try {
    await resumeMachine(cx, m);
  } catch (e) {
    cx.rt.d.log('warn', 'suspended box could not be woken to stop; its saved state is dropped', {
      id: m.id,
      error: (e as Error).message,
    });
    rmSync(suspendStateFile(row), { force: true });
    cx.rt.d.hv.ram.remove(suspendRamFile(row));
  }
  return cx.rt.store.get(m.id) as MachineRow;
}
