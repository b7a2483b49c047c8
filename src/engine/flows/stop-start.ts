import { existsSync } from 'node:fs';
import { HutchError, orStorageFull } from '../../errors.js';
import { boxSpecOf } from '../box-view.js';
import type { BootImage } from '../images.js';
import { checkTransition } from '../lifecycle.js';
import type { Machine } from '../machine.js';
import type { MachineRow } from '../store.js';
import type { FlowContext } from './context.js';
import { bootBox } from './create.js';

/**
 * Stops a box: the guest syncs its disks and powers off, so everything it wrote is kept; the
 * VM's memory and processes are gone. Callers hold the box's lock.
 */
export async function stopBox(cx: FlowContext, m: Machine): Promise<MachineRow> {
  const { rt } = cx;
  const row = rt.store.get(m.id) as MachineRow;
  if (row.state === 'stopped') return row;
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

/** Boots a stopped box again, on its own disk. Callers hold the box's lock. */
export async function startBox(
  cx: FlowContext,
  m: Machine,
  quota: Parameters<FlowContext['admission']['update']>[2],
): Promise<MachineRow> {
  const { rt } = cx;
  const t0 = performance.now();
  const row = rt.store.get(m.id) as MachineRow;
  if (row.state === 'running') return row;
  // stopped → starting is recorded by the admission, in the transaction that checks the caps.
  const starting = checkTransition(row, 'start');
  const image = boxImage(row);
  await cx.admission.update(row, { state: starting, error: null, mode: 'cold' }, quota);
  try {
    rt.own(m, 'box');
    await bootBox(cx, m, rt.store.get(m.id) as MachineRow, image);
    return rt.markRunning(m, Math.round(performance.now() - t0));
  } catch (e) {
    await rt.halt(m);
    rt.transition(m.id, 'stopped', { pid: null, error: (e as Error).message });
    if (e instanceof HutchError) throw e;
    throw orStorageFull(e, 'BOOT_FAILED', `box ${m.id} did not start: ${(e as Error).message}`);
  }
}

/** The image a box boots: the one it was created from, by digest (not whatever its tag is now). */
function boxImage(row: MachineRow): BootImage {
  const image = boxSpecOf(row).manifest;
  if (!existsSync(image.rootfs) || !existsSync(image.kernel))
    throw new HutchError(
      'BOOT_FAILED',
      `box ${row.id}: its image ${image.ref} (${image.digest}) is no longer in the image cache`,
    );
  return image;
}
