import type { AgentConnection } from '../guest/agent-connection.js';
import type { ConsoleTap } from '../vmm/console.js';
import type { Qmp } from '../vmm/hypervisor.js';
import { CleanupStack } from './cleanup-stack.js';
import type { MachineView } from './machine-view.js';

/** A running VM of a machine: what the daemon holds on it. Absent while suspended or stopped. */
export interface Vm {
  pid: number;
  console: ConsoleTap;
  qmp?: Qmp;
  /** Absent while its link is broken and being retried, or while it is paused after adoption. */
  agent?: AgentConnection;
  jail?: MachineView['jail'];
}

/** Runs one lifecycle operation of a machine at a time. */
export class Mutex {
  private tail: Promise<unknown> = Promise.resolve();
  private holders = 0;

  get busy(): boolean {
    return this.holders > 0;
  }

  run<T>(fn: () => Promise<T>): Promise<T> {
    this.holders++;
    const next = this.tail.then(fn, fn);
    this.tail = next.catch(() => {});
    return next.finally(() => {
      this.holders--;
    });
  }
}

/**
 * One machine (or box) as the daemon holds it, from its insert to its removal: its VM when it
 * has one, its TTL timer, the lock its lifecycle operations take, its open sessions and last
 * activity, and the cleanup stack every resource it acquires registers its undo on. Its state
 * is in the store's row; this is what the row cannot hold.
 */
export class Machine {
  readonly cleanup = new CleanupStack();
  readonly lock = new Mutex();
  vm: Vm | undefined;
  ttl: NodeJS.Timeout | undefined;
  /** Open streaming sessions: a machine with one is busy, never idle. */
  sessions = 0;
  lastActive = Date.now();
  /** Consecutive agent link failures (cleared by a link that stays up). */
  agentFailures = 0;
  /** The removal or failure in flight, so that a second one joins it. */
  ending: Promise<void> | undefined;

  constructor(
    readonly id: string,
    readonly runDir: string,
  ) {}

  touch(): void {
    this.lastActive = Date.now();
  }
}

/** The machines this daemon holds, by id. */
export class Registry {
  private readonly machines = new Map<string, Machine>();

  get(id: string): Machine | undefined {
    return this.machines.get(id);
  }

  /** The machine's object, made on first use (a row recovered after a restart, a new insert). */
  ensure(id: string, runDir: string): Machine {
    let m = this.machines.get(id);
    if (!m) {
      m = new Machine(id, runDir);
      this.machines.set(id, m);
    }
    return m;
  }

  /** A machine made before its row (a pooled machine being handed out). */
  add(m: Machine): void {
    this.machines.set(m.id, m);
  }

  delete(id: string): void {
    this.machines.delete(id);
  }

  all(): Machine[] {
    return [...this.machines.values()];
  }
}
