import { execFile } from 'node:child_process';
import { chown } from 'node:fs/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * A machine's disk: a qcow2 overlay over a read-only image (the template's raw image or a
 * snapshot's disk). Creating one is O(1) whatever the image size; nothing below the overlay is
 * ever written. Asynchronous: qemu-img takes ~20 ms, which must not stall other requests.
 */
export async function createOverlay(
  base: string,
  overlay: string,
  baseFormat: 'raw' | 'qcow2',
  owner?: { uid: number; gid: number },
): Promise<void> {
  try {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', baseFormat, '-b', base, overlay]);
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new Error(`qemu-img create failed: ${err.stderr?.trim() || err.message}`);
  }
  // QEMU reopens its disk after an incoming migration, by then as its unprivileged user: the
  // machine's own overlay is that user's (the layers below only need to be readable).
  if (owner) await chown(overlay, owner.uid, owner.gid);
}
