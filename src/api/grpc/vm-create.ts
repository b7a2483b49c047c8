import type { BoxView } from '../../engine/box-view.js';
import type { ProxyView } from '../../engine/net-routing.js';
import { HutchError } from '../../errors.js';
import { createBoxBody } from '../boxes-schemas.js';
import { optionalName, required, text, vmRef } from './args.js';
import { attachAtCreate, volumeMountsOf } from './disks.js';
import type { Cx, Rpc } from './rpc.js';
import { unary } from './rpc.js';
import {
  defaultAutoSuspendSecs,
  refuseVolumes,
  type Sizes,
  setsSize,
  sizesOf,
  srfOf,
  type VmConfig,
} from './vm-config.js';

/**
 * The RPCs that make a VM: CreateVm (from an image or a user template), CreateVmFromTemplate
 * and ForkVm. Each is one box action; what the proto leaves at zero is the default the proto
 * comment names (vm-config.ts).
 */

interface CreateVmRequest {
  name: string;
  image_ref: string;
  env: { key: string; value: string }[];
  cmd: string[];
  restart_policy: string;
  config: VmConfig | null;
}

interface FromTemplateRequest {
  template_id: string;
  name: string;
  config: VmConfig | null;
}

interface ForkRequest {
  source_vm_id: string;
  name: string;
  config: VmConfig | null;
}

const bad = (message: string): HutchError => new HutchError('INVALID_ARGUMENT', message);

/** The environment as a map; a key given twice is a mistake, not "last wins". */
function envOf(env: CreateVmRequest['env']): Record<string, string> | null {
  if (!env.length) return null;
  const out: Record<string, string> = {};
  for (const { key, value } of env) {
    text(key, 'env key');
    text(value, `env ${key}`, 128 * 1024);
    if (Object.hasOwn(out, key)) throw bad(`env ${JSON.stringify(key)} is given twice`);
    out[key] = value;
  }
  return out;
}

/**
 * The boxes API's own schema checks the image, name, sizes and environment: the same rules on
 * both APIs (a template create has no image of its own; a placeholder stands in for the check).
 */
function checked(
  image: string | undefined,
  name: string | undefined,
  sizes: Sizes,
  env: Record<string, string> | null,
): { image: string; name?: string; sizes: Sizes; env: Record<string, string> | null } {
  const parsed = createBoxBody.safeParse({
    image: image ?? 'template',
    ...(name ? { name } : {}),
    cpu: sizes.cpu,
    memory_mb: sizes.memoryMb,
    disk_size_gb: sizes.diskSizeGb,
    env,
  });
  if (!parsed.success)
    throw bad(parsed.error.issues.map((i) => `${i.path.join('.') || 'request'}: ${i.message}`).join('; '));
  return { image: parsed.data.image, ...(name ? { name } : {}), sizes, env: parsed.data.env };
}

function sizeFields(s: Sizes): { cpu: number; memoryMb: number; diskSizeGb: number } {
  return { cpu: s.cpu, memoryMb: s.memoryMb, diskSizeGb: s.diskSizeGb };
}

/**
 * image_ref names a user template (by name or id) when the caller has one so named, else an OCI
 * image; empty is the server's default image.
 */
function templateNamed(cx: Cx, ref: string): string | undefined {
  if (ref === '') return undefined;
  try {
    return cx.act.getTemplate(ref).id;
  } catch (e) {
    if (e instanceof HutchError && e.code === 'TEMPLATE_NOT_FOUND') return undefined;
    throw e;
  }
}

export async function createVm(req: CreateVmRequest, cx: Cx): Promise<Record<string, unknown>> {
  const name = optionalName(req.name);
  const ref = text(req.image_ref, 'image_ref', 512);
  const mounts = volumeMountsOf(req.config, cx);
  const cmd = req.cmd.map((a, i) => text(a, `cmd[${i}]`));
  const template = templateNamed(cx, ref);
  // From a template, sizes left at zero are the template's own.
  const sizes = sizesOf(cx, req.config);
  const c = checked(template ? undefined : ref || cx.app.defaultImage, name, sizes, envOf(req.env));
  const box = await cx.act.createBox({
    ...(template ? { template } : { image: c.image }),
    ...(c.name ? { name: c.name } : {}),
    ...(!template || setsSize(req.config) ? sizeFields(c.sizes) : {}),
    env: c.env,
    ...(cmd.length ? { cmd } : {}),
    ...(req.restart_policy ? { restartPolicy: req.restart_policy } : {}),
    ...srfOf(req.config, defaultAutoSuspendSecs),
    // boxd VMs have the internet (behind their firewall) whenever this server has networking.
    network: cx.app.engine.networking(),
  });
  await attachAtCreate(cx, box.id, mounts);
  return { ...created(box, cx, proxiesFor(box, req.config, cx)), image: box.image };
}

/**
 * A new VM's proxies: a default one named after it (port "auto": the first port it listens on)
 * and those its config asks for. Networking off: none. A default name already taken (proxy names
 * are global) leaves the VM without one; a requested name taken is an error, before the reply.
 */
function proxiesFor(box: BoxView, config: VmConfig | null, cx: Cx): ProxyView[] {
  if (!cx.app.engine.networking()) return [];
  const out: ProxyView[] = [];
  for (const e of config?.network?.proxies ?? [])
    out.push(cx.act.createProxy({ name: e.name, vm: box.id, port: e.port }));
  try {
    out.unshift(cx.act.createDefaultProxy(box.id));
  } catch (e) {
    if (!(e instanceof HutchError && e.code === 'NAME_TAKEN')) throw e;
  }
  return out;
}

async function createVmFromTemplate(req: FromTemplateRequest, cx: Cx): Promise<Record<string, unknown>> {
  const template = required(req.template_id, 'template_id');
  const name = optionalName(req.name);
  const mounts = volumeMountsOf(req.config, cx);
  const sized = setsSize(req.config);
  if (sized) checked(undefined, name, sizesOf(cx, req.config), null);
  const box: BoxView = await cx.act.createBox({
    template,
    ...(name ? { name } : {}),
    ...(sized ? sizeFields(sizesOf(cx, req.config)) : {}),
    ...srfOf(req.config, defaultAutoSuspendSecs),
    network: cx.app.engine.networking(),
  });
  await attachAtCreate(cx, box.id, mounts);
  return created(box, cx, proxiesFor(box, req.config, cx));
}

/**
 * A live fork: the source's memory, processes and disk, so its size is the source's (a config
 * that sets one is refused rather than ignored). SrfConfig applies to the fork; unset, its
 * auto-suspend is inherited.
 */
async function forkVm(req: ForkRequest, cx: Cx): Promise<Record<string, unknown>> {
  const source = vmRef(req.source_vm_id, 'source_vm_id');
  const name = optionalName(req.name);
  refuseVolumes(
    req.config,
    "a fork has its source's disks (read-write ones copied); attach more with AttachDisk",
  );
  if (setsSize(req.config))
    throw bad(
      "a fork continues its source's memory: config vcpu, memory_bytes and disk_bytes must be 0 (inherited)",
    );
  const timers = srfOf(req.config, undefined);
  const f = await cx.act.forkBox(source, name ? { name } : {});
  // The fork's own timers, when asked for, are set on it as a second step (forkBox takes none).
  const view = Object.keys(timers).length ? cx.act.setBoxTimers(f.id, timers) : f;
  const proxies = view.network ? proxiesFor(view, null, cx) : [];
  return {
    vm_id: view.id,
    name: view.name ?? '',
    public_ip: view.address ?? '',
    url: proxies[0]?.url ?? '',
    image: view.image,
    status: view.status,
    forked_from: f.forked_from,
    boot_time_ms: String(f.boot_ms),
  };
}

export const vmCreateRpcs: Record<string, Rpc> = {
  CreateVm: unary(createVm),
  CreateVmFromTemplate: unary(createVmFromTemplate),
  ForkVm: unary(forkVm),
};

/**
 * What CreateVm and CreateVmFromTemplate answer alike. public_ip: where the owner's other VMs
 * reach it (hutch gives no VM a public address of its own); url: its default proxy's, when the
 * server has a public domain.
 */
function created(box: BoxView, _cx: Cx, proxies: ProxyView[]): Record<string, unknown> {
  return {
    vm_id: box.id,
    name: box.name ?? '',
    public_ip: box.address ?? '',
    url: proxies[0]?.url ?? '',
    status: box.status,
    boot_time_ms: String(box.boot_ms ?? 0),
  };
}
