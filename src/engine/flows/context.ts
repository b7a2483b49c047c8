import { join } from 'node:path';
import type { Config } from '../../config.js';
import { HutchError } from '../../errors.js';
import type { TemplateManifest } from '../../images/builder.js';
import type { SnapshotCache } from '../../images/snapshots.js';
import type { Admission } from '../admission.js';
import type { BootImage, ImageResolver } from '../images.js';
import type { WarmPool } from '../pool.js';
import type { Runtime } from '../runtime.js';
import type { MachineRow } from '../store.js';

/** What the flows share: the runtime steps, admission, the pool and the artifact caches. */
export interface FlowContext {
  rt: Runtime;
  config: Config;
  admission: Admission;
  pool: WarmPool;
  snapshots: SnapshotCache;
  templates: Map<string, TemplateManifest>;
  images: ImageResolver | undefined;
}

export type { BootImage, MachineRow };

type RowIdentity = Pick<
  MachineRow,
  | 'id'
  | 'owner'
  | 'name'
  | 'template'
  | 'template_hash'
  | 'mode'
  | 'accel'
  | 'vcpus'
  | 'memory_mb'
  | 'kind'
  | 'persistent'
  | 'ttl_seconds'
  | 'created_at'
  | 'expires_at'
>;

/**
 * The row of a machine about to be made (created, branched, pooled): `starting`, never run, no
 * QEMU yet, in its own run dir. What it is comes from `fields`; what a new machine cannot have
 * yet is reset here even when `fields` carries it (a branch starts from its source's row).
 */
export function newRow(runRoot: string, fields: RowIdentity & Partial<MachineRow>): MachineRow {
  return {
    auto_suspend_seconds: null,
    parent_id: null,
    spec: null,
    net: 0,
    display: null,
    ...fields,
    state: 'starting',
    boot_ms: null,
    pid: null,
    error: null,
    jail: null,
    started_at: null,
    stopped_at: null,
    run_dir: join(runRoot, fields.id),
  };
}

/** The lifetime fields of a machine starting now: a TTL, or none when persistent. */
export function lifetime(
  persistent: boolean,
  ttl: number,
): Pick<MachineRow, 'persistent' | 'ttl_seconds' | 'created_at' | 'expires_at'> {
  const now = Date.now();
  return {
    persistent: persistent ? 1 : 0,
    ttl_seconds: persistent ? null : ttl,
    created_at: new Date(now).toISOString(),
    expires_at: persistent ? null : new Date(now + ttl * 1000).toISOString(),
  };
}

/** A box's lifetime from now: none, or its auto-destroy timeout (seconds; null or 0: never). */
export function boxLifetime(
  autoDestroySeconds: number | null | undefined,
): Pick<MachineRow, 'persistent' | 'ttl_seconds' | 'created_at' | 'expires_at'> {
  return autoDestroySeconds ? lifetime(false, autoDestroySeconds) : lifetime(true, 0);
}

export const ttlBounds = { min: 15, max: 900, default: 60 } as const;

export function clampTtl(ttl: number | undefined): number {
  if (ttl === undefined) return ttlBounds.default;
  return Math.min(ttlBounds.max, Math.max(ttlBounds.min, Math.round(ttl)));
}

/**
 * Refuses a name the user already gave a machine or a box: both kinds share one name space per
 * user (a name stands for an id on every API), so the message says which object holds it.
 */
export function checkNameFree(cx: FlowContext, user: string, name: string | undefined): void {
  if (name === undefined) return;
  const holder = cx.rt.store.findByName(user, name);
  if (holder)
    throw new HutchError(
      'NAME_TAKEN',
      `a ${holder.kind} named ${JSON.stringify(name)} already exists (${holder.id}); machines and boxes share your names`,
    );
}
