/**
 * How a machine ends. `detach`: the daemon lets go (shutdown) and the VM runs on, to be adopted;
 * `halt`: the VM ends and its data stays (suspend, a box stopped or failed); `destroy`: all of it.
 */
export type Ending = 'detach' | 'halt' | 'destroy';

interface Entry {
  what: string;
  on: ReadonlySet<Ending>;
  undo: () => unknown;
}

/** Where the undo of each kind of resource belongs. */
export const ends = {
  /** A daemon-side handle on the VM (QMP, agent link, console tap, timers): every ending. */
  handle: new Set<Ending>(['detach', 'halt', 'destroy']),
  /** Something that lives as long as the VM (its QEMU, its cgroup, a tap device). */
  vm: new Set<Ending>(['halt', 'destroy']),
  /** Something that lives as long as the machine (its run dir, disk, memory file on disk). */
  machine: new Set<Ending>(['destroy']),
} as const;

export interface CleanupFailure {
  what: string;
  error: Error;
}

/**
 * Every resource a machine acquires registers its undo here as it is acquired; every way the
 * machine ends runs the matching undos once, newest first, carrying on past failures (a step
 * that fails must not leave the later ones undone). A resource added after its ending has run
 * is undone at once, so a step that raced an end never leaks.
 */
export class CleanupStack {
  private readonly entries: Entry[] = [];
  private ended: Ending | undefined;

  push(what: string, on: ReadonlySet<Ending>, undo: () => unknown): void {
    if (this.ended === 'destroy' && on.has('destroy')) {
      void Promise.resolve()
        .then(undo)
        .catch(() => {});
      return;
    }
    this.entries.push({ what, on, undo });
  }

  has(what: string): boolean {
    return this.entries.some((e) => e.what === what);
  }

  /** What is registered now, newest last (for tests and debugging). */
  list(): string[] {
    return this.entries.map((e) => e.what);
  }

  /** Runs the undos of `ending`, newest first; the others stay registered. */
  async run(ending: Ending): Promise<CleanupFailure[]> {
    if (ending === 'destroy') this.ended = 'destroy';
    const failures: CleanupFailure[] = [];
    for (let i = this.entries.length - 1; i >= 0; i--) {
      const e = this.entries[i];
      if (!e?.on.has(ending)) continue;
      this.entries.splice(i, 1);
      try {
        await e.undo();
      } catch (err) {
        failures.push({ what: e.what, error: err instanceof Error ? err : new Error(String(err)) });
      }
    }
    return failures;
  }
}
