import { readFileSync } from 'node:fs';

/**
 * Whether process `pid` is alive: a QEMU, a builder holding a lock, a daemon that registered in
 * the image cache. A zombie counts as dead (it still answers kill(0)); a process of another user
 * (EPERM) counts as alive.
 */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}
