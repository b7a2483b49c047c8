import { chownSync, constants, copyFileSync } from 'node:fs';
import { type AgentConnection, connectAgent } from '../guest/agent-connection.js';
import { connectWhileAlive } from './boot-wait.js';
import {
  type CgroupLimits,
  cgroupSupport,
  confine,
  listMachineCgroups,
  memoryProcsFiles,
  prepareCgroup,
  releaseCgroup,
} from './cgroup.js';
import { ConsoleTap } from './console.js';
import { createOverlay } from './disk.js';
import {
  type CopyOptions,
  copyMemoryFile,
  createMemoryFile,
  memoryFileOf,
  prepareMemoryDir,
  removeMemoryFile,
  sweepMemoryFiles,
} from './memory-file.js';
import {
  loadState,
  type MachineSave,
  type MachineSaved,
  type MigrationResult,
  saveMachine,
  saveState,
} from './migration.js';
import { isAlive, isQemuOf, killAndWait, launchQemu, listHutchQemus, stopQemu, type VmSpec } from './qemu.js';
import { QmpClient } from './qmp.js';

/** The part of a QMP connection the engine uses (a fake in unit tests). */
export interface Qmp {
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T>;
  close(): void;
  isOpen(): boolean;
}

export interface VmProcess {
  pid: number;
  id: string;
  argv: string[];
}

export interface Owner {
  uid: number;
  gid: number;
}

/**
 * Everything the engine does to a VM on the host, as one interface: QEMU processes, QMP,
 * migration streams, cgroups, consoles and disks. The engine never imports child_process or
 * vmm/ functions directly, so its lifecycle is tested with a fake (test/helpers/fake-vmm.ts).
 */
export interface Hypervisor {
  readonly cgroups: 'v2' | 'v1' | 'none';
  /** Starts a VM detached from the daemon (it outlives a restart); returns its pid. */
  launch(spec: VmSpec): number;
  isAlive(pid: number): boolean;
  /** `pid` is the VM of machine `id` (not a reused pid). */
  isVmOf(pid: number, id: string): boolean;
  /** Every VM process of hutch on this host (any daemon's). */
  list(): VmProcess[];
  kill(pid: number): Promise<boolean>;
  /** Asks the VM to quit, then kills it after `graceMs`. */
  stop(pid: number, qmpSocket: string, graceMs?: number): Promise<void>;
  qmp(socket: string, timeoutMs: number): Promise<Qmp>;
  saveState(
    qmp: Qmp,
    migDir: string,
    outFile: string,
    opts: { ignoreShared: boolean; maxBytesPerSecond?: number },
  ): Promise<MigrationResult>;
  loadState(
    qmp: Qmp,
    migDir: string,
    stateFile: string,
    opts: { ignoreShared: boolean },
  ): Promise<MigrationResult>;
  /** A stopped machine's device state plus a copy of its RAM file (src/vmm/migration.ts). */
  saveMachine(qmp: Qmp, migDir: string, save: MachineSave): Promise<MachineSaved>;
  /** Machines' RAM files: shared, file-backed guest memory on tmpfs (src/vmm/memory-file.ts). */
  readonly ram: RamFiles;
  /**
   * The cgroup.procs files a copy of machine `id`'s RAM is written from (its cgroup made ahead
   * of its QEMU), so the pages are charged to the machine that will own them.
   */
  chargeTo(id: string, limits: CgroupLimits): string[] | undefined;
  /** Puts the VM in its own cgroup with these limits; returns the cgroup kind. Throws if it can't. */
  confine(id: string, pid: number, limits: CgroupLimits): string;
  releaseCgroup(id: string, timeoutMs?: number): Promise<boolean>;
  listCgroups(): string[];
  console(socket: string, logFile: string): ConsoleTap;
  createOverlay(
    base: string,
    overlay: string,
    format: 'raw' | 'qcow2',
    owner?: Owner,
    size?: number,
  ): Promise<void>;
  /** A full copy of a machine's disk (a reflink where the filesystem can). */
  copyDisk(from: string, to: string, owner?: Owner): void;
}

export interface RamFiles {
  fileOf(machineId: string): string;
  /** An empty (all holes) RAM file of `bytes`. */
  create(path: string, bytes: number, owner?: Owner): void;
  /** A sparse copy (only what the guest touched), renamed into place when complete. */
  copy(from: string, to: string, opts: CopyOptions): Promise<number>;
  remove(path: string): void;
  /** Removes the files of machines `keep` does not claim; returns their ids. */
  sweep(keep: (machineId: string) => boolean): string[];
}

/** The guest side: connecting to a VM's agent. */
export interface GuestLink {
  connect(socket: string, timeoutMs: number): Promise<AgentConnection>;
  /** Connects to a booting VM's agent, failing as soon as the VM exits. */
  connectBooting(
    pid: number,
    runDir: string,
    timeoutMs: number,
    context: () => string,
  ): Promise<AgentConnection>;
}

/** QEMU, as the engine uses it on a real host; machines' RAM files live in `ramDir`. */
export function qemuHypervisor(binary: string, ramDir: string, qemuUser?: Owner): Hypervisor {
  prepareMemoryDir(ramDir, qemuUser);
  const cgroups = cgroupSupport();
  return {
    cgroups,
    launch: (spec) => launchQemu(binary, spec),
    isAlive,
    isVmOf: isQemuOf,
    list: listHutchQemus,
    kill: (pid) => killAndWait(pid),
    stop: stopQemu,
    qmp: (socket, timeoutMs) => QmpClient.connect(socket, timeoutMs),
    saveState: (qmp, migDir, out, opts) => saveState(qmp, migDir, out, opts),
    loadState: (qmp, migDir, file, opts) => loadState(qmp, migDir, file, opts),
    saveMachine,
    ram: {
      fileOf: (id) => memoryFileOf(ramDir, id),
      create: createMemoryFile,
      copy: copyMemoryFile,
      remove: removeMemoryFile,
      sweep: (keep) => sweepMemoryFiles(ramDir, keep),
    },
    chargeTo: (id, limits) => (cgroups === 'none' ? undefined : memoryProcsFiles(prepareCgroup(id, limits))),
    confine: (id, pid, limits) => confine(id, pid, limits).kind,
    releaseCgroup,
    listCgroups: listMachineCgroups,
    console: (socket, log) => new ConsoleTap(socket, log),
    createOverlay,
    copyDisk: (from, to, owner) => {
      copyFileSync(from, to, constants.COPYFILE_FICLONE);
      if (owner) chownSync(to, owner.uid, owner.gid);
    },
  };
}

export const agentLink: GuestLink = {
  connect: (socket, timeoutMs) => connectAgent(socket, { timeoutMs }),
  connectBooting: connectWhileAlive,
};
