import { chmodSync, chownSync, mkdirSync } from 'node:fs';
import { runPaths } from './qemu.js';

export interface QemuUser {
  user: string;
  uid: number;
  gid: number;
}

/**
 * Makes a directory QEMU can use after dropping root: the run dir traversable, the migration
 * dir owned by the QEMU user (QEMU creates and connects to migration sockets there).
 */
export function prepareRunDir(runDir: string, runAs: QemuUser | undefined): void {
  mkdirSync(runDir, { recursive: true, mode: 0o700 });
  traversableByQemu(runDir, runAs);
  const mig = runPaths(runDir).migDir;
  mkdirSync(mig, { recursive: true, mode: 0o700 });
  if (runAs) chownSync(mig, runAs.uid, runAs.gid);
}

/**
 * A directory QEMU's user must pass through (to its disks, kernel, migration sockets) but no
 * other local user may enter: group QEMU's user, mode 0710. Without a separate QEMU user the
 * daemon's own user runs QEMU, and 0700 does.
 */
export function traversableByQemu(dir: string, runAs: QemuUser | undefined): void {
  if (runAs) {
    chownSync(dir, process.getuid?.() ?? 0, runAs.gid);
    chmodSync(dir, 0o710);
  } else {
    chmodSync(dir, 0o700);
  }
}
