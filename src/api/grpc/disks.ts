import type { DiskView } from '../../engine/disk-actions.js';
import { HutchError } from '../../errors.js';
import { required, text, u64, vmRef } from './args.js';
import { type Cx, type Rpc, unary } from './rpc.js';
import type { VmConfig } from './vm-config.js';

/**
 * Disks (engine/disk-actions.ts): ext4 images on this host, attached to a running VM at a mount
 * path (hot-plugged SCSI disks, mounted before the call answers), read-write on one VM or
 * read-only on several. `disk_id` accepts the disk's id or its name.
 */

function diskInfo(d: DiskView): Record<string, unknown> {
  return {
    disk_id: d.disk_id,
    name: d.name,
    size_bytes: String(d.size_bytes),
    status: d.status,
    worker_id: d.worker_id,
    attachments: d.attachments.map((a) => ({
      vm_id: a.vm_id,
      vm_name: a.vm_name,
      mount_path: a.mount_path,
      mount_mode: a.mount_mode,
    })),
  };
}

export const diskRpcs: Record<string, Rpc> = {
  CreateDisk: unary(async (req: { name: string; size_bytes: string }, cx) => {
    const d = await cx.act.createDisk({
      name: text(required(req.name, 'name'), 'name', 63),
      sizeBytes: u64(req.size_bytes, 'size_bytes'),
    });
    return { disk_id: d.disk_id, name: d.name, size_bytes: String(d.size_bytes), status: d.status };
  }),
  ListDisks: unary((_req: unknown, cx) => ({ disks: cx.act.listDisks().map(diskInfo) })),
  AttachDisk: unary(
    async (req: { disk_id: string; vm_id: string; mount_path: string; read_only: boolean }, cx) => {
      await cx.act.attachDisk({
        disk: required(req.disk_id, 'disk_id'),
        vm: vmRef(req.vm_id),
        mountPath: text(required(req.mount_path, 'mount_path'), 'mount_path', 200),
        readOnly: req.read_only === true,
        kind: 'box',
      });
      return {};
    },
  ),
  DetachDisk: unary(async (req: { disk_id: string; vm_id: string }, cx) => {
    await cx.act.detachDisk({ disk: required(req.disk_id, 'disk_id'), vm: vmRef(req.vm_id), kind: 'box' });
    return {};
  }),
  DestroyDisk: unary(async (req: { disk_id: string }, cx) => {
    await cx.act.destroyDisk(required(req.disk_id, 'disk_id'));
    return {};
  }),
};

/** VmConfig.volumes, checked: each names a disk of the caller's and an absolute mount path. */
export function volumeMountsOf(
  c: VmConfig | null,
  cx: Cx,
): { disk: string; mountPath: string; readOnly: boolean }[] {
  const out = (c?.volumes ?? []).map((v, i) => {
    const m = v as { disk_id?: string; mount_path?: string; read_only?: boolean };
    return {
      disk: required(m.disk_id ?? '', `config.volumes[${i}].disk_id`),
      mountPath: text(required(m.mount_path ?? '', `config.volumes[${i}].mount_path`), 'mount_path', 200),
      readOnly: m.read_only === true,
    };
  });
  // Before the VM exists: a disk that is not there fails the create, not an attach after it.
  for (const v of out) cx.act.getDisk(v.disk);
  if (new Set(out.map((v) => v.mountPath)).size !== out.length)
    throw new HutchError('INVALID_ARGUMENT', 'config.volumes: two disks at one mount_path');
  return out;
}

/**
 * Mounts a new VM's disks before CreateVm answers; a disk that cannot be attached removes the
 * VM again (nothing half-made is left) and fails the call with the attach's error.
 */
export async function attachAtCreate(
  cx: Cx,
  vmId: string,
  mounts: readonly { disk: string; mountPath: string; readOnly: boolean }[],
): Promise<void> {
  try {
    for (const v of mounts) await cx.act.attachDisk({ ...v, vm: vmId, kind: 'box' });
  } catch (e) {
    await cx.act.removeBox(vmId, true).catch(() => {});
    throw e;
  }
}
