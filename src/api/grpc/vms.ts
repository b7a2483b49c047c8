import type { BoxView } from '../../engine/box-view.js';
import { vmRef } from './args.js';
import { type Rpc, unary } from './rpc.js';

/**
 * VM lifecycle RPCs. A boxd VM is a hutch box (an OCI image on a persistent disk, stopped and
 * started rather than expiring), so each RPC is one box action. Networking is not served yet:
 * public_ip is where the owner's other VMs reach it (no VM has a public address of its own).
 */

interface VmRef {
  vm_id: string;
}

/** GetVmResponse of a box. */
export function vmInfo(b: BoxView): Record<string, unknown> {
  return {
    vm_id: b.id,
    name: b.name ?? '',
    image_ref: b.image,
    public_ip: b.address ?? '',
    status: b.status,
    restart_policy: b.restart_policy,
    disk_bytes: String(b.disk_size_gb * 1024 ** 3),
    auto_suspend_timeout_secs: b.auto_suspend_seconds,
  };
}

export const vmRpcs: Record<string, Rpc> = {
  DestroyVm: unary(async (req: VmRef, cx) => {
    // Destroy means gone, running or not (the boxes API's force=true).
    await cx.act.removeBox(vmRef(req.vm_id), true);
    return {};
  }),
  StartVm: unary(async (req: VmRef, cx) => {
    await cx.act.startBox(vmRef(req.vm_id));
    return {};
  }),
  StopVm: unary(async (req: VmRef, cx) => {
    await cx.act.stopBox(vmRef(req.vm_id));
    return {};
  }),
  RebootVm: unary(async (req: VmRef, cx) => {
    await cx.act.rebootBox(vmRef(req.vm_id));
    return {};
  }),
  SuspendVm: unary(async (req: VmRef, cx) => {
    const r = await cx.act.suspendBox(vmRef(req.vm_id));
    return { suspend_us: String(r.suspend_us) };
  }),
  ResumeVm: unary(async (req: VmRef, cx) => {
    const r = await cx.act.resumeBox(vmRef(req.vm_id));
    return { resume_us: String(r.resume_us) };
  }),
  SetAutoSuspendTimeout: unary((req: { vm_id: string; timeout_secs: number }, cx) => {
    // 0 disables it; vm_id may be a name, like everywhere.
    cx.act.setBoxTimers(vmRef(req.vm_id), { autoSuspendSeconds: req.timeout_secs });
    return {};
  }),
  GetVm: unary((req: VmRef, cx) => vmInfo(cx.act.getBox(vmRef(req.vm_id)))),
  ListVms: unary((_req: unknown, cx) => ({ vms: cx.act.listBoxes().map(vmInfo) })),
  GetConfig: unary((_req: unknown, cx) => ({ default_image: cx.app.defaultImage, zone: 'local' })),
};
