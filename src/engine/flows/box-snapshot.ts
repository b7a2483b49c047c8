import { HutchError } from '../../errors.js';
import type { TemplateManifest } from '../../images/builder.js';
import type { SnapshotParams, TemplateSnapshot } from '../../images/snapshots.js';
import type { BootImage } from '../images.js';
import type { FlowContext } from './context.js';

/** Box snapshots are taken on a disk of the spec's default size (8 GiB). */
export const boxSnapshotDiskBytes = 8 * 1024 ** 3;

/**
 * The snapshot boxes of this image and size restore from, as the snapshot cache names it. The
 * size is in the snapshot's key (with the device layout), so each size has its own. Snapshots
 * are taken with a disk of the default size: a bigger disk is a resize after the restore, a
 * smaller one needs a cold boot (a filesystem does not shrink).
 */
function boxSnapshotTarget(
  cx: FlowContext,
  image: BootImage,
  cpu: number,
  memoryMb: number,
  net: boolean,
): { manifest: TemplateManifest; params: SnapshotParams } {
  const manifest = { ...image, name: `box-${image.hash}` };
  const params = {
    ...cx.rt.snapshotParams(manifest, { vcpus: cpu, memoryMb }, true, net),
    // Nothing is known to exist in an image but the agent: no warm-up commands.
    warm: [],
    diskBytes: boxSnapshotDiskBytes,
  };
  return { manifest, params };
}

/**
 * The snapshot boxes of this image and size restore from, if it is ready; otherwise its
 * first creation is started (in the background, after this create) and the box boots cold.
 */
export function boxSnapshot(
  cx: FlowContext,
  image: BootImage,
  cpu: number,
  memoryMb: number,
  diskBytes: number,
  net = false,
): TemplateSnapshot | undefined {
  if (diskBytes < boxSnapshotDiskBytes) return undefined;
  const { rt } = cx;
  const { manifest, params } = boxSnapshotTarget(cx, image, cpu, memoryMb, net);
  const ready = cx.snapshots.get(manifest, params);
  if (ready || cx.snapshots.status(manifest, params) !== 'none') return ready;
  setImmediate(() => {
    // A snapshot build is a QEMU too: it waits for a later create when the caps are reached.
    if (rt.d.closing() || !cx.admission.hasRoomFor(memoryMb)) return;
    cx.snapshots.ensure(manifest, params).then(
      (s) => rt.d.log('info', 'box snapshot ready', { image: image.ref, key: s.key }),
      (e: unknown) =>
        rt.d.log('warn', 'box snapshot failed; boxes of this image boot cold', {
          image: image.ref,
          error: (e as Error).message,
        }),
    );
  });
  return undefined;
}

/**
 * Makes sure the snapshot of this image and size exists, waiting for it (a user template's
 * promise: a box created from it restores). Refused when the caps leave no room for the QEMU
 * that takes it. Undefined for a disk under the snapshots' size: those boxes always boot cold.
 */
export async function ensureBoxSnapshot(
  cx: FlowContext,
  image: BootImage,
  cpu: number,
  memoryMb: number,
  diskBytes: number,
  net = false,
): Promise<TemplateSnapshot | undefined> {
  if (diskBytes < boxSnapshotDiskBytes) return undefined;
  const { manifest, params } = boxSnapshotTarget(cx, image, cpu, memoryMb, net);
  const ready = cx.snapshots.get(manifest, params);
  if (ready) return ready;
  if (!cx.admission.hasRoomFor(memoryMb))
    throw new HutchError(
      'RESOURCE_EXHAUSTED',
      `no room for the ${memoryMb} MiB VM that snapshots the template: the server's caps are reached`,
    );
  const s = await cx.snapshots.ensure(manifest, params);
  cx.rt.d.log('info', 'box snapshot ready', { image: image.ref, key: s.key });
  return s;
}
