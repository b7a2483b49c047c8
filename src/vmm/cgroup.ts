import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Per-machine resource caps through cgroups. QEMU's -m and -smp only bound what the guest sees;
 * the cgroup bounds what the QEMU process may take from the host (guest RAM + device and TCG
 * overhead, CPU time, process count). cgroup v2 is used when it has the controllers, else v1
 * (this CI host runs the v1/hybrid layout). Where neither is writable the machine runs without
 * host-side caps and says so in its `jail` report.
 */
export interface CgroupLimits {
  memoryBytes: number;
  cpus: number;
  pids: number;
}

export interface CgroupHandle {
  kind: 'v2' | 'v1';
  paths: string[];
}

const root = '/sys/fs/cgroup';
const periodUs = 100_000;

function v2Root(): string | undefined {
  for (const dir of [root, join(root, 'unified')]) {
    try {
      const controllers = readFileSync(join(dir, 'cgroup.controllers'), 'utf8');
      if (controllers.includes('memory') && controllers.includes('cpu')) return dir;
    } catch {
      // not a v2 mount
    }
  }
  return undefined;
}

function write(path: string, value: string): void {
  writeFileSync(path, value);
}

export function cgroupSupport(): 'v2' | 'v1' | 'none' {
  if (v2Root()) return 'v2';
  if (existsSync(join(root, 'memory', 'cgroup.procs')) && existsSync(join(root, 'cpu', 'cgroup.procs')))
    return 'v1';
  return 'none';
}

/** Creates the machine's cgroup(s), sets the limits and moves `pid` in. Throws if it can't. */
export function confine(name: string, pid: number, limits: CgroupLimits): CgroupHandle {
  const handle = prepareCgroup(name, limits);
  // Threads QEMU starts later inherit the cgroup, so moving the process once is enough.
  for (const dir of handle.paths) write(join(dir, 'cgroup.procs'), String(pid));
  return handle;
}

/** What a machine of this size may take from the host: guest RAM plus QEMU and TCG's cache. */
export function machineLimits(memoryMb: number, vcpus: number): CgroupLimits {
  return { memoryBytes: (memoryMb + 192) * 1024 * 1024, cpus: vcpus, pids: 256 };
}

/**
 * The file(s) a process writes its pid to to join the cgroup's memory accounting: under v1 only
 * the memory controller's (a copy joining the machine's cpu group would be throttled by its quota).
 */
export function memoryProcsFiles(handle: CgroupHandle): string[] {
  const dirs = handle.kind === 'v2' ? handle.paths : handle.paths.filter((d) => d.includes('/memory/'));
  return dirs.map((dir) => join(dir, 'cgroup.procs'));
}

/**
 * Creates the machine's cgroup(s) with their limits, nobody in them yet (idempotent). Made
 * before QEMU starts when the daemon fills the machine's RAM file for it: tmpfs pages are charged
 * to the cgroup of whoever writes them first, and they belong to the machine, not the daemon.
 */
export function prepareCgroup(name: string, limits: CgroupLimits): CgroupHandle {
  const v2 = v2Root();
  if (v2) {
    const parent = join(v2, 'hutch');
    mkdirSync(parent, { recursive: true });
    try {
      write(join(parent, 'cgroup.subtree_control'), '+memory +cpu +pids');
    } catch {
      // already enabled, or delegated differently; the per-file writes below tell
    }
    const dir = join(parent, name);
    mkdirSync(dir, { recursive: true });
    write(join(dir, 'memory.max'), String(limits.memoryBytes));
    write(join(dir, 'cpu.max'), `${Math.round(limits.cpus * periodUs)} ${periodUs}`);
    write(join(dir, 'pids.max'), String(limits.pids));
    return { kind: 'v2', paths: [dir] };
  }
  const paths: string[] = [];
  const mk = (controller: string): string => {
    const dir = join(root, controller, 'hutch', name);
    mkdirSync(dir, { recursive: true });
    paths.push(dir);
    return dir;
  };
  const mem = mk('memory');
  write(join(mem, 'memory.limit_in_bytes'), String(limits.memoryBytes));
  const cpu = mk('cpu');
  write(join(cpu, 'cpu.cfs_period_us'), String(periodUs));
  write(join(cpu, 'cpu.cfs_quota_us'), String(Math.round(limits.cpus * periodUs)));
  if (existsSync(join(root, 'pids', 'cgroup.procs'))) {
    const pids = mk('pids');
    write(join(pids, 'pids.max'), String(limits.pids));
  }
  return { kind: 'v1', paths };
}

function machineCgroupDirs(name: string): string[] {
  const dirs = [join(root, 'hutch', name), join(root, 'unified', 'hutch', name)];
  for (const c of ['memory', 'cpu', 'pids']) dirs.push(join(root, c, 'hutch', name));
  return dirs.filter((d) => existsSync(d));
}

/**
 * Removes a machine's cgroups. A cgroup can only be removed once empty, and a killed QEMU leaves
 * it only when it has been reaped, which happens a moment later: retry for a while.
 */
export async function releaseCgroup(name: string, timeoutMs = 3000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let left = 0;
    for (const dir of machineCgroupDirs(name)) {
      try {
        rmdirSync(dir);
      } catch {
        left++;
      }
    }
    if (left === 0) return true;
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Names of machine cgroups that exist under hutch/ (to find ones a crash left behind). */
export function listMachineCgroups(): string[] {
  const names = new Set<string>();
  for (const parent of [
    join(root, 'hutch'),
    join(root, 'unified', 'hutch'),
    join(root, 'memory', 'hutch'),
    join(root, 'cpu', 'hutch'),
    join(root, 'pids', 'hutch'),
  ]) {
    try {
      for (const e of readdirSync(parent, { withFileTypes: true })) if (e.isDirectory()) names.add(e.name);
    } catch {
      // no such hierarchy
    }
  }
  return [...names];
}
