import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Outside-address slots, shared by every daemon on the host (each test daemon has its own state
 * dir, all share the kernel's routing table): one file per taken slot, created O_EXCL, holding
 * the namespace that has it. /run is a tmpfs, so slots go with the namespaces at a reboot.
 */
export class SlotTable {
  constructor(
    private readonly dir: string,
    private readonly size: number,
  ) {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  }

  /** Takes a free slot for `owner` (a namespace name). */
  take(owner: string): number {
    const start = 1 + Math.floor(Math.random() * (this.size - 1));
    for (let i = 0; i < this.size - 1; i++) {
      const slot = 1 + ((start - 1 + i) % (this.size - 1));
      let fd: number;
      try {
        fd = openSync(join(this.dir, String(slot)), 'wx', 0o600);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EEXIST') continue;
        throw e;
      }
      try {
        writeSync(fd, owner);
      } finally {
        closeSync(fd);
      }
      return slot;
    }
    throw new Error(`no free network slot (all ${this.size - 1} taken)`);
  }

  release(slot: number, owner: string): void {
    if (this.ownerOf(slot) === owner) rmSync(join(this.dir, String(slot)), { force: true });
  }

  ownerOf(slot: number): string | undefined {
    try {
      return readFileSync(join(this.dir, String(slot)), 'utf8');
    } catch {
      return undefined;
    }
  }

  /** Every taken slot and its owner. */
  list(): { slot: number; owner: string }[] {
    const out: { slot: number; owner: string }[] = [];
    for (const f of readdirSync(this.dir)) {
      if (!/^\d+$/.test(f)) continue;
      const owner = this.ownerOf(Number(f));
      if (owner !== undefined) out.push({ slot: Number(f), owner });
    }
    return out;
  }
}
