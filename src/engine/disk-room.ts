import { statfsSync, statSync } from 'node:fs';
import { HutchError } from '../errors.js';

/** A guest disk: how big the guest may make it, and the host file that grows as it does. */
export interface DiskClaim {
  virtualBytes: number;
  file: string;
}

export interface DiskRoom {
  /** What the state filesystem has free for hutch now. */
  free_bytes: number;
  /** Disk promised to guests and not yet used: each disk's size less what its file holds. */
  promised_bytes: number;
  overcommit: number;
}

/**
 * Guest disks are thin: a 64 GiB box disk costs nothing until the guest writes. Every byte a
 * guest may still write is counted against what the host can give, so a guest filling its own
 * disk never fills the host's (unless the operator overcommits, explicitly).
 */
export function diskRoom(stateDir: string, claims: DiskClaim[], overcommit: number): DiskRoom {
  const fs = statfsSync(stateDir);
  let promised = 0;
  for (const c of claims) promised += Math.max(0, c.virtualBytes - allocatedBytes(c.file));
  return { free_bytes: fs.bavail * fs.bsize, promised_bytes: promised, overcommit };
}

/** Throws STORAGE_FULL when `need` more bytes of guest disk cannot be promised. */
export function checkDiskRoom(room: DiskRoom, need: number, what: string): void {
  const limit = room.free_bytes * room.overcommit;
  if (need + room.promised_bytes <= limit) return;
  const gib = (n: number): string => `${(n / 1024 ** 3).toFixed(1)} GiB`;
  throw new HutchError(
    'STORAGE_FULL',
    `${what} needs up to ${gib(need)} of host disk: ${gib(room.free_bytes)} is free and ${gib(room.promised_bytes)} of it is already promised to other guests' disks` +
      (room.overcommit !== 1
        ? ` (overcommit ${room.overcommit})`
        : '; HUTCH_DISK_OVERCOMMIT allows promising more'),
  );
}

function allocatedBytes(file: string): number {
  try {
    return statSync(file).blocks * 512;
  } catch {
    return 0;
  }
}
