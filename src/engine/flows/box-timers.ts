import { HutchError } from '../../errors.js';
import type { Machine } from '../machine.js';
import type { MachineRow } from '../store.js';
import { boxLifetime, type FlowContext } from './context.js';

export interface BoxTimers {
  /** Idle seconds before the box is suspended to disk (it wakes on use); 0 or null: never. */
  autoSuspendSeconds?: number | null;
  /** Seconds from now until the box is removed; 0 or null: never. */
  autoDestroySeconds?: number | null;
}

/** Longest timer accepted (a year): past it the date arithmetic is no longer meaningful. */
const maxSeconds = 365 * 24 * 3600;

export function checkSeconds(what: string, v: number | null | undefined): void {
  if (v === undefined || v === null) return;
  if (!Number.isInteger(v) || v < 0 || v > maxSeconds)
    throw new HutchError(
      'INVALID_ARGUMENT',
      `${what} must be a whole number of seconds from 0 to ${maxSeconds}`,
    );
}

/**
 * Sets a box's timers; what is absent stays as it is. Auto-suspend is the sweeper's, as for
 * machines (engine.ts `sweep`): idle is counted from the last use, so setting it also counts
 * as one. Auto-destroy is the row's TTL (expires_at), counted from this call: the TTL timer and
 * the sweeper remove the box when it passes, whatever its state (stopped and suspended too).
 */
export function setBoxTimers(cx: FlowContext, m: Machine, row: MachineRow, t: BoxTimers): MachineRow {
  const { rt } = cx;
  checkSeconds('auto_suspend_seconds', t.autoSuspendSeconds);
  checkSeconds('auto_destroy_seconds', t.autoDestroySeconds);
  const fields: Partial<MachineRow> = {};
  if (t.autoSuspendSeconds !== undefined) fields.auto_suspend_seconds = t.autoSuspendSeconds ?? 0;
  if (t.autoDestroySeconds !== undefined) {
    const { persistent, ttl_seconds, expires_at } = boxLifetime(t.autoDestroySeconds);
    Object.assign(fields, { persistent, ttl_seconds, expires_at });
  }
  rt.store.update(row.id, fields);
  m.touch();
  const now = rt.store.get(row.id) as MachineRow;
  rt.armTtl(now);
  return now;
}
