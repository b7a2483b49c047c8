import { spawnSync } from 'node:child_process';
import { chownSync } from 'node:fs';

/**
 * A machine's disk: a qcow2 overlay over a read-only image (the template's raw image, a
 * snapshot's disk, or a frozen layer). Creating one is O(1) whatever the image size; nothing
 * below the overlay is ever written.
 */
export function createOverlay(
  base: string,
  overlay: string,
  baseFormat: 'raw' | 'qcow2',
  owner?: { uid: number; gid: number },
): void {
  const args = ['create', '-q', '-f', 'qcow2', '-F', baseFormat, '-b', base, overlay];
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr || r.error?.message || r.status}`);
  // QEMU reopens its disk after an incoming migration, by then as its unprivileged user: the
  // machine's own overlay is that user's (the layers below only need to be readable).
  if (owner) chownSync(overlay, owner.uid, owner.gid);
}
