import { HutchError } from '../errors.js';
import type { MachineRow, MachineState } from './store.js';

/**
 * What can happen to a machine. Operations that leave the state as it is (branch, exec) are
 * events too, so "may I do this now?" has one answer, in this table.
 */
export type LifecycleEvent =
  /** A create, branch, restore or box start finished booting. */
  | 'booted'
  | 'pause'
  | 'continue'
  | 'suspend'
  /** The machine's state is on disk and its QEMU gone. */
  | 'suspended'
  /** A suspend failed; the machine runs on as it was. */
  | 'suspend-undone'
  | 'wake'
  | 'woke'
  | 'wake-failed'
  /** A box powering off (stop), and done. */
  | 'stop'
  | 'stopped'
  | 'start'
  | 'destroy'
  /** QEMU died, the agent gave up, a boot failed after it was announced. */
  | 'fail'
  /** Source-side operations that change nothing about its state. */
  | 'branch'
  | 'work';

export type MachineKind = MachineRow['kind'];

type Table = Partial<Record<MachineState, Partial<Record<LifecycleEvent, MachineState>>>>;

const live = { destroy: 'destroying' } as const;

/**
 * A machine (REST /v1/machines): lives until deleted or its TTL; pause, suspend to disk,
 * branch; a failure keeps the row, marked failed, so its owner can read why.
 */
const machineTable: Table = {
  starting: { booted: 'running', fail: 'failed', ...live },
  running: {
    pause: 'paused',
    suspend: 'suspending',
    continue: 'running',
    branch: 'running',
    work: 'running',
    fail: 'failed',
    ...live,
  },
  paused: {
    continue: 'running',
    pause: 'paused',
    suspend: 'suspending',
    branch: 'paused',
    fail: 'failed',
    ...live,
  },
  suspending: { suspended: 'suspended', 'suspend-undone': 'running', fail: 'failed', ...live },
  suspended: { wake: 'resuming', suspend: 'suspended', ...live },
  resuming: { woke: 'running', 'wake-failed': 'suspended', fail: 'failed', ...live },
  failed: { ...live },
  destroying: { ...live },
};

/**
 * A box (REST /v1/boxes, gRPC VMs) is a machine with another policy: no TTL unless it has an
 * auto-destroy timeout, stop/start (and reboot: both) as well as suspend to disk and branch
 * (fork), and a failure stops it (its disk is its user's data) instead of marking it failed.
 * Stopping a suspended box wakes it first (stopping → the guest powers off, so what it had in
 * its page cache reaches the disk); when its saved state cannot be restored, the state is
 * dropped and the box is stopped with its disk as the suspend left it (flows/stop-start.ts).
 * Starting a suspended box, or using it (exec, files, sessions), wakes it.
 */
const boxTable: Table = {
  starting: { booted: 'running', stopped: 'stopped', fail: 'stopped', ...live },
  running: {
    stop: 'stopping',
    start: 'running',
    pause: 'paused',
    suspend: 'suspending',
    continue: 'running',
    branch: 'running',
    work: 'running',
    fail: 'stopped',
    ...live,
  },
  paused: {
    stop: 'stopping',
    continue: 'running',
    pause: 'paused',
    suspend: 'suspending',
    branch: 'paused',
    fail: 'stopped',
    ...live,
  },
  suspending: { suspended: 'suspended', 'suspend-undone': 'running', fail: 'stopped', ...live },
  suspended: { wake: 'resuming', suspend: 'suspended', stop: 'stopping', ...live },
  resuming: { woke: 'running', 'wake-failed': 'suspended', fail: 'stopped', ...live },
  stopping: { stopped: 'stopped', fail: 'stopped', ...live },
  stopped: { start: 'starting', stop: 'stopped', ...live },
  destroying: { ...live },
};

const tables: Record<MachineKind, Table> = { machine: machineTable, box: boxTable };

/** The state `event` leads to from `state`, or undefined when it is not allowed there. */
export function nextState(
  kind: MachineKind,
  state: MachineState,
  event: LifecycleEvent,
): MachineState | undefined {
  return tables[kind][state]?.[event];
}

/** Every (state, event) pair the table allows, for tests and docs. */
export function allowedTransitions(kind: MachineKind): [MachineState, LifecycleEvent, MachineState][] {
  const out: [MachineState, LifecycleEvent, MachineState][] = [];
  for (const [state, events] of Object.entries(tables[kind]))
    for (const [event, to] of Object.entries(events ?? {}))
      out.push([state as MachineState, event as LifecycleEvent, to as MachineState]);
  return out;
}

const verbs: Partial<Record<LifecycleEvent, string>> = {
  pause: 'pause',
  continue: 'resume',
  suspend: 'suspend',
  wake: 'resume',
  branch: 'branch',
  work: 'use',
  stop: 'stop',
  start: 'start',
};

/**
 * The state `event` leads to, or the error a user sees when it is not allowed now: the
 * machine's state (and why it is in it) rather than a generic refusal.
 */
export function checkTransition(row: MachineRow, event: LifecycleEvent): MachineState {
  const to = nextState(row.kind, row.state, event);
  if (to !== undefined) return to;
  const why = row.error ? ` (${row.error})` : '';
  if (row.kind === 'box')
    throw new HutchError(
      'BOX_NOT_RUNNING',
      `cannot ${verbs[event] ?? event} box ${row.id}: it is ${row.state}${why}`,
    );
  throw new HutchError(
    'MACHINE_NOT_RUNNING',
    `cannot ${verbs[event] ?? event} machine ${row.id}: it is ${row.state}${why}`,
  );
}

/** What a restarted daemon does with a row, from its state and what it finds on the host. */
export type Recovery =
  | 'adopt-running'
  | 'adopt-paused'
  /** A suspend whose state file was complete: end the QEMU, the machine is suspended. */
  | 'finish-suspend'
  /** A suspend cut before its state file was complete: continue the source. */
  | 'undo-suspend'
  /** A resume cut short: back to suspended (the state file is still there). */
  | 'back-to-suspended'
  /** Nothing to do now but keep its TTL (suspended, failed). */
  | 'keep'
  /** A box caught stopping or restarting: stopped, disk kept. */
  | 'box-stopped'
  /** It was running but its QEMU is gone, or its saved state is lost. */
  | 'fail'
  /** It never ran (mid-create) or was being destroyed: finish removing it. */
  | 'remove';

export function recoveryOf(row: MachineRow, found: { alive: boolean; saved: boolean }): Recovery {
  const { alive, saved } = found;
  switch (row.state) {
    case 'running':
      return alive ? 'adopt-running' : 'fail';
    case 'paused':
      return alive ? 'adopt-paused' : 'fail';
    case 'suspending':
      if (alive) return saved ? 'finish-suspend' : 'undo-suspend';
      return saved ? 'back-to-suspended' : 'fail';
    case 'resuming':
      return saved ? 'back-to-suspended' : 'fail';
    // A box's too: a suspended box stays suspended (wakes on use), its auto-destroy re-armed.
    case 'suspended':
    case 'failed':
      return 'keep';
    case 'stopped':
      return 'box-stopped';
    case 'stopping':
      return row.kind === 'box' ? 'box-stopped' : 'remove';
    case 'starting':
      // A box that ran before (a restart was cut) keeps its disk; a new one never existed.
      return row.kind === 'box' && row.started_at !== null ? 'box-stopped' : 'remove';
    case 'destroying':
      return 'remove';
  }
}
