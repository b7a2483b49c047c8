import type { MachineRow } from './store.js';

/** A machine as every API surface shows it. */
export interface MachineView {
  id: string;
  name: string | null;
  owner: string;
  template: string;
  status: 'starting' | 'running' | 'failed' | 'destroying';
  mode: 'cold';
  boot_ms: number | null;
  accel: string;
  vcpus: number;
  memory_mb: number;
  persistent: boolean;
  ttl_seconds: number | null;
  created_at: string;
  expires_at: string | null;
  error: string | null;
  jail: { seccomp: boolean; user: string | null; cgroup: string | null } | null;
}

export function toView(row: MachineRow): MachineView {
  return {
    id: row.id,
    name: row.name,
    owner: row.owner,
    template: row.template,
    status: row.state,
    mode: row.mode,
    boot_ms: row.boot_ms,
    accel: row.accel,
    vcpus: row.vcpus,
    memory_mb: row.memory_mb,
    persistent: row.persistent === 1,
    ttl_seconds: row.ttl_seconds,
    created_at: row.created_at,
    expires_at: row.expires_at,
    error: row.error,
    jail: row.jail ? (JSON.parse(row.jail) as MachineView['jail']) : null,
  };
}
