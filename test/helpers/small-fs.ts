import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A small ext4 filesystem on a loop device, for a daemon state directory that can fill up. */
export interface SmallFs {
  /** Where it is mounted. */
  mnt: string;
  /** Unmounts it and removes the image. */
  close(): void;
}

/**
 * Mounts a fresh `bytes`-sized ext4 (no reserved blocks: 100 % is 100 % for root too) under a
 * temporary directory named `hutch-<prefix>-…`. Mounts a run that died mid-way left are removed
 * first. The directory above it is 0755: QEMU's user passes through it to run dirs and disks.
 */
export function smallFs(prefix: string, bytes: number): SmallFs {
  for (const line of readFileSync('/proc/mounts', 'utf8').split('\n')) {
    const at = line.split(' ')[1] ?? '';
    if (new RegExp(`/hutch-${prefix}-[^/]+/mnt$`).test(at)) {
      execFileSync('umount', ['-l', at]);
      rmSync(join(at, '..'), { recursive: true, force: true });
    }
  }
  const base = mkdtempSync(join(tmpdir(), `hutch-${prefix}-`));
  chmodSync(base, 0o755);
  const mnt = join(base, 'mnt');
  mkdirSync(mnt);
  const img = join(base, 'fs.img');
  execFileSync('truncate', ['-s', String(bytes), img]);
  execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', img]);
  execFileSync('mount', ['-o', 'loop', img, mnt]);
  return {
    mnt,
    close: () => {
      execFileSync('umount', ['-l', mnt]);
      rmSync(base, { recursive: true, force: true });
    },
  };
}

/** Writes into `dir` until the filesystem refuses another byte; returns the files written. */
export function fill(dir: string): string[] {
  const files: string[] = [];
  for (const block of [1024 * 1024, 4096, 512]) {
    const path = join(dir, `filler-${block}`);
    files.push(path);
    const fd = openSync(path, 'w');
    const buf = Buffer.alloc(block, 0x5a);
    try {
      for (;;) writeSync(fd, buf);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOSPC') throw e;
    } finally {
      closeSync(fd);
    }
  }
  return files;
}
