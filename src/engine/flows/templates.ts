import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import type { Principal } from '../../core/principal.js';
import { HutchError } from '../../errors.js';
import { specTime } from '../box-view.js';
import type { BootImage } from '../images.js';
import type { Store, TemplateRow } from '../store.js';
import { ensureBoxSnapshot } from './box-snapshot.js';
import type { FlowContext } from './context.js';
import type { CreateBox, CreateBoxRequest } from './create.js';

/**
 * User templates (gRPC CreateTemplate): an image and a size, booted once and snapshotted so that
 * boxes created from it restore in snapshot time instead of booting. A template is a record
 * over the image and snapshot caches, not an artifact of its own: the snapshot is the box
 * snapshot of that image and size (flows/box-snapshot.ts), shared with every box of the same
 * image and size, and kept by the cache collector while it is current or used.
 */
export interface CreateTemplate {
  name: string;
  image: string;
  cpu: number;
  memoryMb: number;
  diskSizeGb: number;
}

export interface TemplateView {
  id: string;
  name: string;
  image: string;
  status: TemplateRow['status'];
  cpu: number;
  memory_mb: number;
  disk_size_gb: number;
  created_at: string;
  error?: string | null;
}

export function toTemplateView(row: TemplateRow): TemplateView {
  return {
    id: row.id,
    name: row.name,
    image: row.image,
    status: row.status,
    cpu: row.cpu,
    memory_mb: row.memory_mb,
    disk_size_gb: row.disk_size_gb,
    created_at: specTime(row.created_at) ?? '',
    error: row.error,
  };
}

/** The caller's template: another user's does not exist for them (TEMPLATE_NOT_FOUND, no hint). */
export function findTemplate(store: Store, p: Principal, idOrName: string): TemplateRow {
  const row = store.findTemplate(p.user, idOrName);
  if (!row) throw new HutchError('TEMPLATE_NOT_FOUND', `no template ${JSON.stringify(idOrName)}`);
  return row;
}

/**
 * Records the template (building), resolves its image and waits for its snapshot; answers with
 * the record ready, or failed with the cause (the record stays so its owner can read why).
 */
export async function createTemplate(
  cx: FlowContext,
  p: Principal,
  req: CreateTemplate,
): Promise<TemplateRow> {
  const { rt, config } = cx;
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(req.name))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `template name ${JSON.stringify(req.name)}: letters, digits, ".", "_" and "-", at most 63`,
    );
  const over = (what: string, v: number, max: number): HutchError =>
    new HutchError('LIMIT_EXCEEDED', `${what} ${v} is over this server's limit of ${max}`);
  if (req.cpu > config.maxBoxCpu) throw over('cpu', req.cpu, config.maxBoxCpu);
  if (req.memoryMb > config.maxBoxMemoryMb) throw over('memory_mb', req.memoryMb, config.maxBoxMemoryMb);
  if (req.diskSizeGb > config.maxBoxDiskGb) throw over('disk_size_gb', req.diskSizeGb, config.maxBoxDiskGb);
  if (!cx.images) throw new HutchError('INTERNAL', 'this daemon has no image store');
  const row: TemplateRow = {
    id: `tpl-${randomBytes(6).toString('hex')}`,
    owner: p.user,
    name: req.name,
    image: req.image,
    status: 'building',
    cpu: req.cpu,
    memory_mb: req.memoryMb,
    disk_size_gb: req.diskSizeGb,
    manifest: null,
    error: null,
    created_at: new Date().toISOString(),
  };
  rt.store.insertTemplate(row);
  try {
    const image = await cx.images.resolve(req.image);
    rt.store.updateTemplate(row.id, { manifest: JSON.stringify(image) });
    // Under the snapshots' disk size there is no snapshot: such boxes always boot cold.
    const snap = await ensureBoxSnapshot(cx, image, req.cpu, req.memoryMb, req.diskSizeGb * 1024 ** 3);
    rt.store.updateTemplate(row.id, { status: 'ready' });
    rt.d.log('info', 'template ready', { id: row.id, image: image.ref, snapshot: snap?.key ?? null });
  } catch (e) {
    const error = (e as Error).message.slice(0, 1000);
    rt.store.updateTemplate(row.id, { status: 'failed', error });
    rt.d.log('warn', 'template failed', { id: row.id, image: req.image, error });
  }
  return findTemplate(rt.store, p, row.id);
}

/**
 * Removes the record at once. Its artifacts (image disk, snapshot) are left to the cache
 * collector: boxes created from the template reference them and keep them; what nothing
 * references goes once it is old enough (src/images/cache-gc.ts).
 */
export function deleteTemplate(cx: FlowContext, p: Principal, idOrName: string): void {
  cx.rt.store.deleteTemplate(findTemplate(cx.rt.store, p, idOrName).id);
}

/** Builds cut by a daemon restart never finish: say so instead of `building` forever. */
export function failInterruptedBuilds(store: Store): void {
  for (const t of store.listTemplates())
    if (t.status === 'building')
      store.updateTemplate(t.id, { status: 'failed', error: 'the daemon restarted while it was built' });
}

/**
 * A create request made whole: a template's image and size are its defaults (and its image as
 * resolved then, so the box restores from the template's snapshot even if the tag has moved),
 * else the boxes API's defaults.
 */
export function fromTemplate(
  cx: FlowContext,
  p: Principal,
  r: CreateBoxRequest,
): { req: CreateBox; image?: BootImage; templateId?: string } {
  const { template, ...rest } = r;
  const base = { network: false, env: null, volumes: null, ...withoutUndefined(rest) };
  if (template === undefined || template === '') {
    if (!r.image) throw new HutchError('INVALID_ARGUMENT', 'a box needs an image (or a template)');
    return { req: { cpu: 2, memoryMb: 1024, diskSizeGb: 8, ...base, image: r.image } };
  }
  const t = findTemplate(cx.rt.store, p, template);
  if (t.status !== 'ready')
    throw new HutchError(
      'TEMPLATE_NOT_READY',
      `template ${t.name} is ${t.status}${t.error ? `: ${t.error}` : ''}`,
    );
  const req: CreateBox = {
    image: t.image,
    cpu: t.cpu,
    memoryMb: t.memory_mb,
    diskSizeGb: t.disk_size_gb,
    ...base,
  };
  const image = t.manifest ? (JSON.parse(t.manifest) as BootImage) : undefined;
  const same = image && req.image === t.image && existsSync(image.rootfs) && existsSync(image.kernel);
  return { req, ...(same ? { image } : {}), templateId: t.id };
}

function withoutUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}
