import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { DiskClaim } from '../../engine/disk-room.js';
import type { AgentConnection } from '../../guest/agent-connection.js';
import type { Owner } from '../../vmm/hypervisor.js';
import { DiskFiles } from './disk-files.js';
import type { AttachmentRow, DiskRow, DiskStore } from './disk-store.js';

/** A disk device a machine launches with (machine-spec `disk`). */
export interface DiskDevice {
  path: string;
  format: 'raw' | 'qcow2';
  target: number;
  readOnly: boolean;
}

/**
 * Attachable disks on this host: their records (disks.db), their files, and what the runtime
 * asks of them: the devices a machine launches with, mounting them after a cold boot, unmounting
 * them before a machine is destroyed, and forgetting a removed machine's attachments. The
 * principal-level actions (who may attach what where) are engine/disk-actions.ts.
 */
export class Disks {
  readonly files: DiskFiles;
  /** Names the host that holds the disks (gRPC DiskInfo.worker_id). */
  readonly workerId = hostname();
  private readonly locks = new Map<string, Promise<unknown>>();

  constructor(
    readonly store: DiskStore,
    stateDir: string,
    owner: Owner | undefined,
  ) {
    this.files = new DiskFiles(stateDir, owner);
  }

  /**
   * Runs `fn` holding the disk's own lock: two attaches of one disk (to two machines, each under
   * its own machine lock) must not both see it free.
   */
  withDisk<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(id) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => {});
    this.locks.set(id, tail);
    void tail.then(() => {
      if (this.locks.get(id) === tail) this.locks.delete(id);
    });
    return next;
  }

  /** The disks `machineId` launches with: what its saved state (or its guest) has attached. */
  devicesOf(machineId: string): DiskDevice[] {
    return this.store.attachmentsOf(machineId).flatMap((a) => {
      const d = this.store.get(a.disk_id);
      return d ? [{ path: d.path, format: d.format, target: a.target, readOnly: a.read_only === 1 }] : [];
    });
  }

  /** After a cold boot: mounts every disk the machine has attached (they were plugged in at launch). */
  async mountAll(agent: AgentConnection, machineId: string): Promise<void> {
    for (const a of this.store.attachmentsOf(machineId))
      await agent.mountDisk({ target: a.target, path: a.mount_path, readOnly: a.read_only === 1 });
  }

  /**
   * Before a machine is destroyed: each of its disks unmounted (written back, the journal clean)
   * while the guest still runs. Best effort and bounded: a guest that does not answer is killed
   * anyway, and what it had fsync'd is on the disk.
   */
  async unmountAll(agent: AgentConnection | undefined, machineId: string): Promise<void> {
    if (!agent?.supports('disks')) return;
    for (const a of this.store.attachmentsOf(machineId))
      await agent.unmountDisk({ target: a.target, path: a.mount_path }, 5000).catch(() => {});
  }

  /** A removed machine's attachments (the disks stay, but for a removed clone's own copies). */
  forget(machineId: string): void {
    for (const path of this.store.forgetMachine(machineId)) this.files.remove(path);
  }

  /** Attachable disks as promised host disk (each may grow to its size). */
  claims(): DiskClaim[] {
    return this.store.all().map((d) => ({ virtualBytes: d.size_bytes, file: d.path }));
  }

  attachmentsOf(machineId: string): AttachmentRow[] {
    return this.store.attachmentsOf(machineId);
  }

  get(id: string): DiskRow | undefined {
    return this.store.get(id);
  }

  close(): void {
    this.store.close();
  }
}

/** A new disk id: `disk-` and 16 random hex digits. */
export function newDiskId(): string {
  return `disk-${randomBytes(8).toString('hex')}`;
}

/** A read-write disk of a branch's source that QEMU copies for the clone (a backup job). */
export interface DiskCopy {
  /** The source's device is `disk<target>`; the clone's disk sits on the same target. */
  target: number;
  /** The clone's new, empty file. */
  path: string;
}

/**
 * A branch's disks, planned while its source is stopped: a disk attached read-only is shared
 * (it stays read-only everywhere), a disk attached read-write gets a new disk of the clone's
 * owner, named `<name>-<clone id>`, attached at the same target and path, whose data the
 * caller has QEMU copy as of the instant the source stopped. The clone's guest has them mounted
 * already (its memory is the source's). They go with the clone (Disks.forget).
 */
export async function cloneDisks(
  disks: Disks,
  sourceId: string,
  cloneId: string,
  owner: string,
): Promise<DiskCopy[]> {
  const copies: DiskCopy[] = [];
  const made: string[] = [];
  try {
    for (const a of disks.store.attachmentsOf(sourceId)) {
      const d = disks.store.get(a.disk_id);
      if (!d) continue;
      let diskId = d.id;
      if (a.read_only === 0) {
        diskId = newDiskId();
        const path = await disks.files.emptyFor(diskId, d.size_bytes);
        disks.store.insert({
          id: diskId,
          owner,
          name: `${d.name}-${cloneId}`.slice(0, 120),
          size_bytes: d.size_bytes,
          path,
          format: 'qcow2',
          created_at: Date.now(),
          clone_of: cloneId,
        });
        made.push(diskId);
        copies.push({ target: a.target, path });
      }
      disks.store.attach({ ...a, disk_id: diskId, machine_id: cloneId, created_at: Date.now() });
    }
  } catch (e) {
    undoClone(disks, cloneId, made);
    throw e;
  }
  return copies;
}

export function undoClone(disks: Disks, cloneId: string, made: readonly string[]): void {
  disks.forget(cloneId);
  for (const id of made) {
    const d = disks.store.get(id);
    if (d) disks.files.remove(d.path);
    disks.store.delete(id);
  }
}
