import { boxSpecOf } from './box-view.js';
import type { FlowContext } from './flows/context.js';
import { suspendMachine } from './flows/suspend.js';
import { checkTransition } from './lifecycle.js';
import type { Machine } from './machine.js';
import type { MachineRow } from './store.js';

/**
 * The sweeper's pass over machines and boxes (every 500 ms, engine.ts): TTLs and auto-destroy
 * that passed, ends whose last write failed, QEMUs that died unreported, idle auto-suspend.
 */
export function sweepMachines(cx: FlowContext): void {
  const { rt } = cx;
  for (const row of rt.store.list()) {
    const m = rt.machine(row);
    if (m.lock.busy) continue;
    if (row.expires_at && new Date(row.expires_at).getTime() <= Date.now() && row.state !== 'destroying') {
      rt.background('ttl expiry', { id: row.id }, () => rt.expire(row.id));
    } else if (row.state === 'destroying') {
      // An end whose last write failed (a full disk): its resources are gone, the row not yet.
      rt.background('destroy retry', { id: row.id }, () => rt.endLocked(row.id, 'deleted'));
    } else if (
      (row.state === 'running' || row.state === 'paused') &&
      row.pid !== null &&
      !rt.d.hv.isAlive(row.pid)
    ) {
      rt.background('failure cleanup', { id: row.id }, () =>
        rt.endLocked(row.id, 'failed', 'qemu exited unexpectedly'),
      );
    } else if (row.state === 'running' && idleSuspendDue(cx, row, m)) {
      rt.background('auto-suspend', { id: row.id }, () =>
        m.lock.run(async () => {
          // Still idle once the lock is ours: a request may have come in meanwhile.
          const now = rt.store.get(row.id);
          if (now?.state === 'running' && idleSuspendDue(cx, now, m)) await suspendMachine(cx, m);
        }),
      );
    }
  }
}

/** Idle: no request touched the machine or box for its auto-suspend timeout (0 = never). */
function idleSuspendDue(cx: FlowContext, row: MachineRow, m: Machine): boolean {
  const timeout = row.auto_suspend_seconds ?? cx.config.autoSuspendSeconds;
  if (!timeout || m.sessions > 0) return false;
  // A box with mounted host directories cannot be saved (flows/restore-target.ts).
  if (row.kind === 'box' && boxSpecOf(row).volumes?.length) return false;
  checkTransition(row, 'suspend');
  const last = Math.max(m.lastActive, Date.parse(row.created_at));
  return Date.now() - last >= timeout * 1000;
}
