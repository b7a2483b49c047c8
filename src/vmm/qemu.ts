import { spawn } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { processAlive } from '../process-alive.js';
import { allocate, type MachineSpec, machineArgs, volumesOf } from './machine-spec.js';
import { QmpClient } from './qmp.js';
import { volumeCmdline } from './volumes.js';

export type Accel = 'kvm' | 'tcg';

/** Everything QEMU needs to boot one machine. Paths are absolute. */
export interface VmSpec {
  /** Machine id; also QEMU's -name, which is how a restarted daemon recognises its processes. */
  id: string;
  accel: Accel;
  /** Size and devices; their transports come from the one slot table (src/vmm/machine-spec.ts). */
  machine: MachineSpec;
  kernel: string;
  cmdline: string;
  runDir: string;
  /** Drop QEMU's privileges to this user after setup (-runas), when set. */
  runAs?: string;
  /**
   * Guest RAM. `ram`: anonymous memory. `file`: a memory file, `share: true` while it is being
   * snapshotted (writes land in the file), `share: false` for a clone (a private copy-on-write
   * mapping: the file is never written). The backend is always named `mem`, so a migration
   * stream fits any of them.
   */
  memory?: { kind: 'ram' } | { kind: 'file'; path: string; share: boolean };
  /** Start paused, waiting for a migration stream (restore, resume, branch). */
  incoming?: boolean;
  /** The network namespace QEMU runs in (its NIC's tap is there); absent: the host's. */
  netns?: string;
}

export interface RunPaths {
  qmp: string;
  agent: string;
  console: string;
  pidFile: string;
  qemuLog: string;
  /** Owned by the QEMU user: migration sockets live here (QEMU makes them after dropping root). */
  migDir: string;
  /** QEMU's VNC server, for machines with a display (reached only by the daemon). */
  vnc: string;
}

export function runPaths(runDir: string): RunPaths {
  return {
    qmp: join(runDir, 'qmp.sock'),
    agent: join(runDir, 'agent.sock'),
    console: join(runDir, 'console.sock'),
    pidFile: join(runDir, 'qemu.pid'),
    qemuLog: join(runDir, 'qemu.log'),
    migDir: join(runDir, 'mig'),
    vnc: join(runDir, 'vnc.sock'),
  };
}

/**
 * The QEMU command line. microvm + virtio-mmio keeps the device model (and attack surface) to
 * what a headless machine needs: the devices of its spec, no network device unless asked for
 * (isolation by absence). The board and the devices come from the allocated spec; the volumes'
 * `hutch.vol=` kernel arguments (for protocol-1 agents; protocol-2 agents mount from CONFIGURE)
 * are appended here, so devices and mounts cannot disagree.
 */
export function qemuArgs(spec: VmSpec): string[] {
  const p = runPaths(spec.runDir);
  const machine = allocate(spec.machine);
  const accel =
    spec.accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg,tb-size=64', '-cpu', 'max'];
  const volumes = volumesOf(spec.machine);
  const args = [
    '-name',
    `guest=hutch-${spec.id},debug-threads=on`,
    ...accel,
    '-object',
    memoryObject(spec),
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-kernel',
    spec.kernel,
    '-append',
    volumes.length ? `${spec.cmdline} ${volumeCmdline(volumes)}` : spec.cmdline,
    '-qmp',
    `unix:${p.qmp},server=on,wait=off`,
    ...machineArgs(machine),
    '-pidfile',
    p.pidFile,
    // seccomp: QEMU may not exec, touch resource limits or use obsolete syscalls. set*id stays
    // allowed only when -runas needs it: seccomp is installed before -runas drops to the VM user,
    // and after that drop (real, effective and saved ids) there is no way back to root anyway.
    '-sandbox',
    `on,obsolete=deny,elevateprivileges=${spec.runAs ? 'allow' : 'deny'},spawn=deny,resourcecontrol=deny`,
  ];
  if (spec.runAs) args.push('-runas', spec.runAs);
  if (spec.incoming) args.push('-incoming', 'defer', '-S');
  return args;
}

function memoryObject(spec: VmSpec): string {
  const size = `size=${spec.machine.memoryMb}M`;
  const m = spec.memory ?? { kind: 'ram' };
  return m.kind === 'ram'
    ? `memory-backend-ram,id=mem,${size}`
    : `memory-backend-file,id=mem,${size},mem-path=${m.path},share=${m.share ? 'on' : 'off'}`;
}

/**
 * Starts QEMU detached from the daemon (own session, no pipes to us), so that a daemon restart
 * does not take running machines down with it; the daemon finds them again by pid and -name.
 */
export function launchQemu(binary: string, spec: VmSpec): number {
  const p = runPaths(spec.runDir);
  const log = openSync(p.qemuLog, 'a', 0o600);
  try {
    // nsenter joins only the network namespace (ip netns exec would also give QEMU a mount
    // namespace of its own) and execs QEMU: the pid is QEMU's.
    const [cmd, args] = spec.netns
      ? ['nsenter', [`--net=/run/netns/${spec.netns}`, '--', binary, ...qemuArgs(spec)]]
      : [binary, qemuArgs(spec)];
    const child = spawn(cmd, args, {
      detached: true,
      stdio: ['ignore', log, log],
      cwd: spec.runDir,
    });
    if (child.pid === undefined) throw new Error(`cannot start ${binary}`);
    child.on('error', () => {
      // reported through the pid check and the log
    });
    child.unref();
    return child.pid;
  } finally {
    closeSync(log);
  }
}

/** A VM process is alive (the one liveness check: src/process-alive.ts). */
export const isAlive = processAlive;

/** True when `pid` is the QEMU process of machine `id` (guards against pid reuse after a restart). */
export function isQemuOf(pid: number, id: string): boolean {
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.some((a) => a.startsWith(`guest=hutch-${id},`)) && isAlive(pid);
  } catch {
    return false;
  }
}

/** Every live QEMU process started for a hutch machine, with its machine id and argv. */
export function listHutchQemus(): { pid: number; id: string; argv: string[] }[] {
  const out: { pid: number; id: string; argv: string[] }[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const argv = readFileSync(`/proc/${e}/cmdline`, 'utf8').split('\0');
      const name = argv.find((a) => a.startsWith('guest=hutch-'));
      if (!name) continue;
      const id = name.slice('guest=hutch-'.length).split(',')[0] ?? '';
      if (isAlive(Number(e))) out.push({ pid: Number(e), id, argv });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** SIGKILL and wait (bounded) until the process is gone. */
export async function killAndWait(pid: number, timeoutMs = 5000): Promise<boolean> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return true;
  }
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!isAlive(pid)) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return !isAlive(pid);
}

/**
 * Stops a QEMU process: QMP `quit` first (QEMU exits on its own terms, flushing its block
 * layer), SIGKILL if it has not gone within `graceMs` or its QMP socket does not answer.
 */
export async function stopQemu(pid: number, qmpSocket: string, graceMs = 1000): Promise<void> {
  try {
    const qmp = await QmpClient.connect(qmpSocket, Math.min(graceMs, 500));
    try {
      await qmp.execute('quit', undefined, graceMs).catch(() => {
        // QEMU may close the socket before it answers: that is the point
      });
    } finally {
      qmp.close();
    }
    const deadline = Date.now() + graceMs;
    while (Date.now() < deadline && isAlive(pid)) await new Promise((r) => setTimeout(r, 10));
  } catch {
    // no QMP: fall through to SIGKILL
  }
  if (isAlive(pid)) await killAndWait(pid);
}
