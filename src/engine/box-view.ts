import type { BootImage } from './images.js';
import type { ExecRow, MachineRow } from './store.js';

export interface BoxVolume {
  host_path: string;
  guest_path: string;
  readonly: boolean;
}

/** What a box was created with, kept as JSON in its row (`spec`). */
export interface BoxSpec {
  image: string;
  /** The image as resolved at create: a restart boots exactly this image, whatever its tag is now. */
  manifest: BootImage;
  digest: string;
  disk_size_gb: number;
  network: boolean;
  workdir: string;
  env: Record<string, string> | null;
  volumes: BoxVolume[] | null;
  /** The image's own environment (OCI config Env), applied before `env`. */
  image_env: string[];
  /** Started in the background after every boot (create, start, reboot), output to the console. */
  cmd?: string[] | null;
  /** What happens when `cmd` exits: no (default), always, on-failure (flows/box-cmd.ts). */
  restart_policy?: RestartPolicy | null;
  /** The user template (`tpl-…`) the box was created from. */
  template_id?: string | null;
  /**
   * The VM runs with every volume slot filled (restored from its image's snapshot, or forked
   * from a box that was): a restore of its saved state (resume, fork) needs the same devices.
   */
  slots?: boolean;
}

export const restartPolicies = ['no', 'always', 'on-failure'] as const;
export type RestartPolicy = (typeof restartPolicies)[number];

/** A box as the boxes API shows it (field names and order as in the spec). */
export interface BoxView {
  id: string;
  name: string | null;
  status: 'running' | 'stopped' | 'starting' | 'stopping' | 'failed' | 'paused' | 'suspended';
  image: string;
  cpu: number;
  memory_mb: number;
  disk_size_gb: number;
  network: boolean;
  /** Where the machines of its network reach it while it runs; null without a network. */
  address: string | null;
  workdir: string;
  env: Record<string, string> | null;
  volumes: BoxVolume[] | null;
  created_at: string;
  started_at: string | null;
  stopped_at: string | null;
  error: string | null;
  digest: string;
  accel: string;
  /** How the box last booted: `snapshot` (restored from its image's snapshot) or `cold`. */
  mode: 'cold' | 'snapshot';
  boot_ms: number | null;
  /** Idle seconds before the box is suspended to disk (0: never); it wakes on use. */
  auto_suspend_seconds: number;
  /** Seconds from create (or the last timer change) until the box is removed (0: never). */
  auto_destroy_seconds: number;
  /** When auto-destroy removes it. */
  expires_at: string | null;
  restart_policy: RestartPolicy;
  cmd: string[] | null;
  /** The box this one was forked from. */
  forked_from: string | null;
  /** The user template it was created from (`tpl-…`). */
  template: string | null;
}

export function boxSpecOf(row: MachineRow): BoxSpec {
  return JSON.parse(row.spec ?? '{}') as BoxSpec;
}

/** The spec's timestamps have no fractional seconds ("2025-01-01T00:00:00Z"). */
export function specTime(iso: string | null): string | null {
  return iso === null ? null : `${iso.slice(0, 19)}Z`;
}

export function toBoxView(row: MachineRow): BoxView {
  const spec = boxSpecOf(row);
  const status: BoxView['status'] =
    row.state === 'suspending' || row.state === 'resuming'
      ? 'running'
      : row.state === 'destroying'
        ? 'stopping'
        : row.state;
  return {
    id: row.id,
    name: row.name,
    status,
    image: spec.image,
    cpu: row.vcpus,
    memory_mb: row.memory_mb,
    disk_size_gb: spec.disk_size_gb,
    network: spec.network,
    address: null,
    workdir: spec.workdir,
    env: spec.env,
    volumes: spec.volumes,
    created_at: specTime(row.created_at) ?? '',
    started_at: specTime(row.started_at),
    stopped_at: specTime(row.stopped_at),
    error: row.error,
    digest: spec.digest,
    accel: row.accel,
    mode: row.mode === 'snapshot' ? 'snapshot' : 'cold',
    boot_ms: row.boot_ms,
    auto_suspend_seconds: row.auto_suspend_seconds ?? 0,
    auto_destroy_seconds: row.ttl_seconds ?? 0,
    expires_at: specTime(row.expires_at),
    restart_policy: spec.restart_policy ?? 'no',
    cmd: spec.cmd ?? null,
    forked_from: row.parent_id,
    template: spec.template_id ?? null,
  };
}

export interface ExecView {
  id: string;
  box_id: string;
  status: ExecRow['status'];
  cmd: string[];
  exit_code: number | null;
  signal: number | null;
  error: string | null;
  created_at: string;
  finished_at: string | null;
}

export function toExecView(row: ExecRow): ExecView {
  return {
    id: row.id,
    box_id: row.box_id,
    status: row.status,
    cmd: JSON.parse(row.cmd) as string[],
    exit_code: row.exit_code,
    signal: row.signal,
    error: row.error,
    created_at: specTime(row.created_at) ?? '',
    finished_at: specTime(row.finished_at),
  };
}
