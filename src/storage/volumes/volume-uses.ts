import { HutchError } from '../../errors.js';

/**
 * What this process is doing with each volume: how many readers, writers and restores use it
 * (the collector and DELETE leave a used volume alone), the writers' queue (saves and PUTs of
 * one volume run one at a time), and whether it is being removed (then nothing starts on it).
 */
export class VolumeUses {
  private readonly counts = new Map<string, number>();
  private readonly tails = new Map<string, Promise<unknown>>();
  private readonly removals = new Set<string>();

  /** Pins the volume; the returned function unpins it (once). */
  use(id: string): () => void {
    if (this.removals.has(id)) throw new HutchError('VOLUME_NOT_FOUND', `no volume ${JSON.stringify(id)}`);
    this.counts.set(id, (this.counts.get(id) ?? 0) + 1);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const n = (this.counts.get(id) ?? 1) - 1;
      if (n <= 0) this.counts.delete(id);
      else this.counts.set(id, n);
    };
  }

  /** Runs `fn` as the volume's only writer, pinned from the time it queues until it ends. */
  async write<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const release = this.use(id);
    const prev = this.tails.get(id) ?? Promise.resolve();
    const run = prev.catch(() => {}).then(fn);
    const tail = run.catch(() => {});
    this.tails.set(id, tail);
    try {
      return await run;
    } finally {
      if (this.tails.get(id) === tail) this.tails.delete(id);
      release();
    }
  }

  count(id: string): number {
    return this.counts.get(id) ?? 0;
  }

  busy(id: string): boolean {
    return this.count(id) > 0 || this.removals.has(id);
  }

  removing(id: string): boolean {
    return this.removals.has(id);
  }

  /** Marks the volume as being removed, unless something uses it (false). */
  tryRemove(id: string): boolean {
    if (this.busy(id)) return false;
    this.removals.add(id);
    return true;
  }

  removed(id: string): void {
    this.removals.delete(id);
  }
}
