import type { Config } from '../../config.js';
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

export const ttlBounds = { min: 15, max: 900, default: 60 } as const;

export function clampTtl(ttl: number | undefined): number {
  if (ttl === undefined) return ttlBounds.default;
  return Math.min(ttlBounds.max, Math.max(ttlBounds.min, Math.round(ttl)));
}
