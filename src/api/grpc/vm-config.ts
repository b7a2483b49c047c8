import { HutchError } from '../../errors.js';
import { u64 } from './args.js';
import type { Cx } from './rpc.js';

/** VmConfig as decoded (defaults: true; a message field left out is null). */
export interface VmConfig {
  vcpu: number;
  memory_bytes: string;
  disk_bytes: string;
  srf: { auto_suspend_timeout_secs?: number | null; auto_destroy_timeout_secs: number } | null;
  network: { ssh: boolean; proxies: { name: string; port: number }[] } | null;
  volumes: unknown[];
}

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
/** The boxes API's default disk (boxes-schemas.ts): box snapshots are taken on a disk this size. */
export const defaultDiskGb = 8;

export interface Sizes {
  cpu: number;
  memoryMb: number;
  diskSizeGb: number;
}

/**
 * VmConfig's sizes, 0 meaning the default as the proto says: vcpu → the caller's quota or 2,
 * memory → the quota or 8 GiB (never more than this server's largest box), disk → the server's
 * default box disk. Memory is rounded up to whole MiB and disk to whole GiB (what boxes are
 * sized in). Values over the server's limits are refused by createBox (LIMIT_EXCEEDED, naming
 * the limit), so nothing is clamped silently here.
 */
export function sizesOf(cx: Cx, c: VmConfig | null): Sizes {
  const lim = cx.app.engine.boxLimits();
  const q = cx.principal.quota;
  const cpu = c?.vcpu ? c.vcpu : Math.min(2, lim.max_cpu, q?.maxVcpus ?? 2);
  const mem = c ? u64(c.memory_bytes, 'config.memory_bytes') : 0;
  const disk = c ? u64(c.disk_bytes, 'config.disk_bytes') : 0;
  return {
    cpu,
    memoryMb: mem ? Math.ceil(mem / MiB) : Math.min(8192, lim.max_memory_mb, q?.maxMemoryMb ?? 8192),
    diskSizeGb: disk ? Math.ceil(disk / GiB) : defaultDiskGb,
  };
}

/**
 * The parts of VmConfig that belong to capabilities this version does not serve: asking for
 * them is an honest UNIMPLEMENTED, never silently ignored. (`network.ssh` is only a default-on
 * wish with nothing to turn off here, so it is accepted.)
 */
/** config.volumes where disks cannot be mounted at create (a fork has its source's; a template none). */
export function refuseVolumes(c: VmConfig | null, why: string): void {
  if (c?.volumes.length) throw new HutchError('INVALID_ARGUMENT', `config.volumes: ${why}`);
}

/** A new VM's idle auto-suspend when SrfConfig leaves it unset (the proto's server default). */
export const defaultAutoSuspendSecs = 30;

/**
 * SrfConfig as box timers: auto-suspend unset → `unsetSuspend` (30 s for a new VM; undefined,
 * i.e. inherited, for a fork), 0 disables; auto-destroy 0 = none.
 */
export function srfOf(
  c: VmConfig | null,
  unsetSuspend: number | undefined,
): { autoSuspendSeconds?: number; autoDestroySeconds?: number } {
  const s = c?.srf;
  const suspend =
    s && s.auto_suspend_timeout_secs !== undefined && s.auto_suspend_timeout_secs !== null
      ? s.auto_suspend_timeout_secs
      : unsetSuspend;
  return {
    ...(suspend !== undefined ? { autoSuspendSeconds: suspend } : {}),
    ...(s?.auto_destroy_timeout_secs ? { autoDestroySeconds: s.auto_destroy_timeout_secs } : {}),
  };
}

/** Whether the config sets any size (vcpu, memory, disk) at all. */
export function setsSize(c: VmConfig | null): boolean {
  return (
    !!c &&
    (c.vcpu !== 0 ||
      u64(c.memory_bytes, 'config.memory_bytes') !== 0 ||
      u64(c.disk_bytes, 'config.disk_bytes') !== 0)
  );
}
