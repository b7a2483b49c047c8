import { execFile } from 'node:child_process';
import { closeSync, openSync, readSync } from 'node:fs';
import { chmod, chown } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * A machine's disk: a qcow2 overlay over a read-only image (the template's raw image or a
 * snapshot's disk). Creating one is O(1) whatever the image size; nothing below the overlay is
 * ever written. Asynchronous: qemu-img takes ~20 ms, which must not stall other requests.
 *
 * `size` (bytes) makes the overlay's virtual disk larger than the base: the guest's agent grows
 * the root ext4 to fill it when CONFIGURE asks (docs/agent-protocol.md, "Growing /"). Without it the
 * overlay is the base's size. Smaller than the base is an error (qemu-img would refuse too,
 * less clearly); sizes are rounded up to whole MiB.
 */
export async function createOverlay(
  base: string,
  overlay: string,
  baseFormat: 'raw' | 'qcow2',
  owner?: { uid: number; gid: number },
  size?: number,
): Promise<void> {
  const args = ['create', '-q', '-f', 'qcow2', '-F', baseFormat, '-b', base, overlay];
  if (size !== undefined) {
    if (!Number.isSafeInteger(size) || size <= 0)
      throw new Error(`disk size ${size}: a positive whole number of bytes`);
    const rounded = Math.ceil(size / 2 ** 20) * 2 ** 20;
    const baseSize = await virtualSize(base, baseFormat);
    if (rounded < baseSize)
      throw new Error(`disk size ${size} is smaller than its image (${baseSize} bytes)`);
    args.push(String(rounded));
  }
  try {
    await run('qemu-img', args);
  } catch (e) {
    throw new Error(`qemu-img create failed: ${stderrOf(e)}`);
  }
  // QEMU reopens its disk after an incoming migration, by then as its unprivileged user: the
  // machine's own overlay is that user's (the layers below only need to be readable).
  if (owner) await chown(overlay, owner.uid, owner.gid);
  // qemu-img creates it world-readable; what the guest writes is its user's alone.
  await chmod(overlay, 0o600);
}

/** The virtual size (bytes) of a disk image. */
export async function virtualSize(image: string, format: 'raw' | 'qcow2'): Promise<number> {
  try {
    const { stdout } = await run('qemu-img', ['info', '--output=json', '-U', '-f', format, image]);
    const size = (JSON.parse(stdout) as { 'virtual-size'?: unknown })['virtual-size'];
    if (typeof size !== 'number') throw new Error('no virtual-size');
    return size;
  } catch (e) {
    throw new Error(`qemu-img info ${image} failed: ${stderrOf(e)}`);
  }
}

function stderrOf(e: unknown): string {
  const err = e as { stderr?: string; message: string };
  return err.stderr?.trim() || err.message;
}

/**
 * The backing file a qcow2 image names (resolved against the image's directory, as QEMU does),
 * or undefined for a raw image or a qcow2 without one. Read from the header itself: the cache's
 * garbage collector follows every overlay's chain and must not spawn qemu-img per disk.
 */
export function backingFile(image: string): string | undefined {
  const fd = openSync(image, 'r');
  try {
    const header = Buffer.alloc(20);
    if (readSync(fd, header, 0, 20, 0) < 20 || header.readUInt32BE(0) !== 0x514649fb) return undefined;
    const offset = Number(header.readBigUInt64BE(8));
    const size = header.readUInt32BE(16);
    // The name is at most 1023 bytes (QEMU's limit); anything else is not a header QEMU wrote.
    if (offset === 0 || size === 0 || size > 1023) return undefined;
    const name = Buffer.alloc(size);
    if (readSync(fd, name, 0, size, offset) < size) return undefined;
    return resolve(dirname(image), name.toString('utf8'));
  } finally {
    closeSync(fd);
  }
}
