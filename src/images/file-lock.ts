import { closeSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { processAlive } from '../process-alive.js';

/**
 * A cross-process lock: an O_EXCL lock file holding the holder's pid. A lock whose holder is
 * dead is taken over, so a crashed build never blocks the next one. Daemons (and test runs)
 * sharing one image cache take turns building the same thing instead of racing.
 */
export async function acquireFileLock(path: string, onWait?: (holder: number) => void): Promise<() => void> {
  for (let waited = 0; ; waited += 100) {
    try {
      const fd = openSync(path, 'wx');
      writeFileSync(fd, String(process.pid));
      closeSync(fd);
      return () => rmSync(path, { force: true });
    } catch {
      let holder = 0;
      try {
        holder = Number(readFileSync(path, 'utf8'));
      } catch {
        continue;
      }
      if (!Number.isInteger(holder) || holder <= 0 || !processAlive(holder)) {
        rmSync(path, { force: true });
        continue;
      }
      if (waited % 10_000 === 0) onWait?.(holder);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
