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
}

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
