import { spawnSync } from 'node:child_process';

/**
 * A machine's disk: a qcow2 overlay over the template's read-only raw image. Creating one is
 * O(1) whatever the image size; the template image is never written.
 */
export function createOverlay(base: string, overlay: string, sizeMb?: number): void {
  const args = ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', base, overlay];
  if (sizeMb) args.push(`${sizeMb}M`);
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr || r.error?.message || r.status}`);
}
