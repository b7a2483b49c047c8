import { statfsSync } from 'node:fs';
import type { Qmp } from '../vmm/hypervisor.js';

/** Below this much free space the host's disk counts as full for guests. */
const lowBytes = 64 * 1024 * 1024;
/** How long after the disk was last seen low the watcher keeps looking for paused guests. */
const lingerMs = 30_000;

export interface DiskPauseHost {
  stateDir: string;
  /** Machines whose vCPUs should be running (state running), with a way to reach their QEMU. */
  running(): string[];
  qmp(id: string): Promise<Qmp>;
  /** Records (or clears, with null) the cause the machine shows its owner. */
  setError(id: string, error: string | null): void;
  log(level: 'info' | 'warn', msg: string, fields: Record<string, unknown>): void;
}

/**
 * When the host's disk fills, QEMU stops a guest whose disk write got ENOSPC (werror=enospc:
 * nothing is lost, the write is retried on `cont`). Left alone, that guest would look running
 * and hang with no stated cause, and stay stopped after space comes back. This finds such
 * guests while space is short, shows the cause on the machine, and continues them once it is back.
 */
export class DiskPauses {
  /** Guests stopped by the full disk, with the cause shown on them. */
  private readonly paused = new Map<string, string>();
  private lowSeen = 0;
  private busy = false;

  constructor(private readonly host: DiskPauseHost) {}

  /** Why the guest is stopped, when a full host disk stopped it (its requests would hang). */
  cause(id: string): string | undefined {
    return this.paused.get(id);
  }

  forget(id: string): void {
    this.paused.delete(id);
  }

  /** One look (cheap while the disk has room and nobody is paused); called by the sweeper. */
  async check(): Promise<void> {
    if (this.busy) return;
    const fs = statfsSync(this.host.stateDir);
    const free = fs.bavail * fs.bsize;
    const low = free < lowBytes;
    if (low) this.lowSeen = Date.now();
    if (!low && this.paused.size === 0 && Date.now() - this.lowSeen > lingerMs) return;
    this.busy = true;
    try {
      for (const id of this.host.running()) {
        try {
          const qmp = await this.host.qmp(id);
          const st = await qmp.execute<{ status: string }>('query-status');
          if (st.status !== 'io-error') {
            if (this.paused.delete(id)) this.host.setError(id, null);
          } else if (!low) {
            await qmp.execute('cont');
            this.paused.delete(id);
            this.host.setError(id, null);
            this.host.log('info', 'guest continued: the host disk has room again', { id });
          } else if (!this.paused.has(id)) {
            // Shown from memory too: on a full disk the store may not take it.
            const cause = `paused by the host: its disk is full (${free} bytes free); the machine continues by itself when space is freed`;
            this.paused.set(id, cause);
            this.host.setError(id, cause);
            this.host.log('warn', 'guest stopped by a full host disk', { id, free_bytes: free });
          }
        } catch {
          // gone meanwhile: the sweeper's other checks handle a dead machine
        }
      }
    } finally {
      this.busy = false;
    }
  }
}
