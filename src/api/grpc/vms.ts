import type { BoxView } from '../../engine/box-view.js';
import { HutchError } from '../../errors.js';
import { createBoxBody } from '../boxes-schemas.js';
import { optionalName, text, vmRef } from './args.js';
import { type Cx, type Rpc, unary } from './rpc.js';
import { refuseUnserved, sizesOf, srfOf, type VmConfig } from './vm-config.js';

/**
 * VM lifecycle RPCs. A boxd VM is a hutch box (an OCI image on a persistent disk, stopped and
 * started rather than expiring), so each RPC is one box action. Networking is not served yet:
 * public_ip and url are always empty, never made up.
 */

interface VmRef {
  vm_id: string;
}

interface CreateVmRequest {
  name: string;
  image_ref: string;
  env: { key: string; value: string }[];
  cmd: string[];
  restart_policy: string;
  config: VmConfig | null;
}

/** GetVmResponse of a box. */
export function vmInfo(b: BoxView): Record<string, unknown> {
  return {
    vm_id: b.id,
    name: b.name ?? '',
    image_ref: b.image,
    public_ip: '',
    status: b.status,
    restart_policy: '',
    disk_bytes: String(b.disk_size_gb * 1024 ** 3),
    auto_suspend_timeout_secs: 0,
  };
}

/** The environment as a map; a key given twice is a mistake, not "last wins". */
function envOf(env: CreateVmRequest['env']): Record<string, string> | null {
  if (!env.length) return null;
  const out: Record<string, string> = {};
  for (const { key, value } of env) {
    text(key, 'env key');
    text(value, `env ${key}`, 128 * 1024);
    if (Object.hasOwn(out, key))
      throw new HutchError('INVALID_ARGUMENT', `env ${JSON.stringify(key)} is given twice`);
    out[key] = value;
  }
  return out;
}

/** What this build cannot do yet is refused by name rather than ignored. */
function refusePending(req: CreateVmRequest): void {
  const asked = [
    req.cmd.length ? 'cmd' : '',
    req.restart_policy ? 'restart_policy' : '',
    Object.keys(srfOf(req.config)).length ? 'config.srf' : '',
  ].filter(Boolean);
  if (asked.length)
    throw new HutchError('NOT_SERVED', `CreateVm ${asked.join(', ')} is not served by this build yet`);
}

export async function createVm(req: CreateVmRequest, cx: Cx): Promise<Record<string, unknown>> {
  const name = optionalName(req.name);
  const image = req.image_ref === '' ? cx.app.defaultImage : text(req.image_ref, 'image_ref', 512);
  refuseUnserved(req.config);
  refusePending(req);
  const sizes = sizesOf(cx, req.config);
  // The boxes API's own schema: the same image, name, size and environment rules on both APIs.
  const parsed = createBoxBody.safeParse({
    image,
    ...(name ? { name } : {}),
    cpu: sizes.cpu,
    memory_mb: sizes.memoryMb,
    disk_size_gb: sizes.diskSizeGb,
    env: envOf(req.env),
  });
  if (!parsed.success)
    throw new HutchError(
      'INVALID_ARGUMENT',
      parsed.error.issues.map((i) => `${i.path.join('.') || 'request'}: ${i.message}`).join('; '),
    );
  const b = parsed.data;
  const box = await cx.act.createBox({
    image: b.image,
    ...(b.name ? { name: b.name } : {}),
    cpu: b.cpu,
    memoryMb: b.memory_mb,
    diskSizeGb: b.disk_size_gb,
    network: false,
    env: b.env,
    volumes: null,
  });
  return {
    vm_id: box.id,
    name: box.name ?? '',
    public_ip: '',
    url: '',
    image: box.image,
    status: box.status,
    boot_time_ms: String(box.boot_ms ?? 0),
  };
}

export const vmRpcs: Record<string, Rpc> = {
  CreateVm: unary(createVm),
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
  GetVm: unary((req: VmRef, cx) => vmInfo(cx.act.getBox(vmRef(req.vm_id)))),
  ListVms: unary((_req: unknown, cx) => ({ vms: cx.act.listBoxes().map(vmInfo) })),
  GetConfig: unary((_req: unknown, cx) => ({ default_image: cx.app.defaultImage, zone: 'local' })),
};
