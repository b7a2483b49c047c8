import { parseScreen } from '../desktop/screen-size.js';
import type { MachineRow, MachineState } from './store.js';

/** A machine as every API surface shows it. */
export interface MachineView {
  id: string;
  name: string | null;
  owner: string;
  template: string;
  status: MachineState;
  mode: 'cold' | 'snapshot' | 'branch' | 'pool';
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
  forked_from: string | null;
  /** Idle seconds before the machine suspends itself (0: never). */
  auto_suspend_seconds: number;
  /** The machine has a NIC behind its firewall (src/net/). */
  net: boolean;
  /** Its screen when it has a display (desktop machines); null: headless. */
  screen: { width: number; height: number } | null;
  /** Where the machines of its network reach it while it runs; null without a network. */
  address: string | null;
}

export function toView(row: MachineRow, defaultAutoSuspend = 0): MachineView {
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
    forked_from: row.parent_id,
    auto_suspend_seconds: row.auto_suspend_seconds ?? defaultAutoSuspend,
    net: row.net === 1,
    screen: parseScreen(row.display) ?? null,
    address: null,
  };
}
