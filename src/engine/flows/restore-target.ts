import { existsSync } from 'node:fs';
import { HutchError } from '../../errors.js';
import type { TemplateManifest } from '../../images/builder.js';
import { boxSpecOf } from '../box-view.js';
import type { BootImage } from '../images.js';
import type { MachineRow } from '../store.js';
import type { FlowContext } from './context.js';

/**
 * What a saved state of `row` is restored into (resume from disk, a branch): the image it runs
 * and the devices it ran with. A machine's image is its template's; a box's is the image it was
 * created from (by digest), with every volume slot filled when it was restored from its image's
 * snapshot: a migration stream only loads into a QEMU with the devices it was saved from.
 */
export function restoreTarget(
  cx: FlowContext,
  row: MachineRow,
): { image: TemplateManifest; devices: { volumeSlots?: boolean } } {
  if (row.kind === 'machine') {
    const manifest = cx.templates.get(row.template);
    if (!manifest) throw new HutchError('TEMPLATE_NOT_READY', `template ${row.template} is not loaded`);
    return { image: manifest, devices: {} };
  }
  const spec = boxSpecOf(row);
  return { image: boxImage(row), devices: spec.slots ? { volumeSlots: true } : {} };
}

/** The image a box boots: the one it was created from, by digest (not whatever its tag is now). */
export function boxImage(row: MachineRow): BootImage {
  const image = boxSpecOf(row).manifest;
  if (!existsSync(image.rootfs) || !existsSync(image.kernel))
    throw new HutchError(
      'BOOT_FAILED',
      `box ${row.id}: its image ${image.ref} (${image.digest}) is no longer in the image cache`,
    );
  return image;
}

/**
 * A box whose VM mounts host directories (9p) cannot have its state saved: QEMU refuses to
 * migrate a guest with a mounted 9p share (its open fids live on the host side), so neither a
 * fork nor a suspend can be made of it.
 */
export function refuseIfVolumes(row: MachineRow, what: 'forked' | 'suspended'): void {
  if (row.kind !== 'box') return;
  const volumes = boxSpecOf(row).volumes ?? [];
  if (volumes.length)
    throw new HutchError(
      'NOT_SUPPORTED',
      `box ${row.id} cannot be ${what}: it mounts host directories (${volumes.map((v) => v.guest_path).join(', ')}), and QEMU cannot save a VM with a mounted 9p share`,
    );
}

/** The not-running error of a row's kind. */
export function notRunning(row: Pick<MachineRow, 'kind'>, message: string): HutchError {
  return new HutchError(row.kind === 'box' ? 'BOX_NOT_RUNNING' : 'MACHINE_NOT_RUNNING', message);
}
