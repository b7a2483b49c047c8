import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config.js';
import type { Quota } from '../core/principal.js';
import { HutchError } from '../errors.js';
import type { TemplateManifest } from '../images/builder.js';
import { boxSpecOf } from './box-view.js';
import { checkDiskRoom, type DiskClaim, type DiskRoom, diskRoom } from './disk-room.js';
import type { MachineRow, Store } from './store.js';

/** QEMUs of this daemon that are no user's machine: the warm pool's and snapshot builds. */
export interface OtherQemus {
  /** How many run or are being made now. */
  count(): number;
  /** Their disks, promised against the host's free space like users'. */
  claims(): DiskClaim[];
  /** Gives one back to make room for a user; false when there is none to give now. */
  yieldOne(): Promise<boolean>;
}

/**
 * Whether one more machine fits: the server-wide caps (machines, guest memory, disk), counting
 * every QEMU this daemon runs, and the caller's own quota. The check runs inside the SQLite
 * transaction that inserts the row, so concurrent creates cannot both squeeze under a cap.
 */
export class Admission {
  /** Users between making room and their insert: the pool must not take back what they freed. */
  usersWaiting = 0;
  private others: OtherQemus = { count: () => 0, claims: () => [], yieldOne: async () => false };

  constructor(
    private readonly config: Config,
    private readonly store: Store,
    private readonly templates: Map<string, TemplateManifest>,
  ) {}

  /** Attachable disks: promised host disk like machines' own (src/storage/disks/). */
  private diskClaims: () => DiskClaim[] = () => [];

  setDiskClaims(claims: () => DiskClaim[]): void {
    this.diskClaims = claims;
  }

  setOthers(others: OtherQemus): void {
    this.others = others;
  }

  /** Inserts a user's machine after making room for it from the pool. */
  async insert(row: MachineRow, diskBytes: number, quota?: Quota): Promise<void> {
    this.usersWaiting++;
    try {
      await this.yieldFor(row.memory_mb);
      try {
        this.store.insertMachine(row, (active) => this.admit(active, row, diskBytes, quota));
      } catch (e) {
        if (e instanceof HutchError) throw e;
        if (/UNIQUE/.test((e as Error).message)) throw nameTaken(row);
        throw e;
      }
    } finally {
      this.usersWaiting--;
    }
  }

  /** Inserts a machine that needs no room made (a pooled machine being handed out). */
  insertNow(row: MachineRow, diskBytes: number, quota?: Quota): void {
    this.usersWaiting++;
    try {
      this.store.insertMachine(row, (active) => this.admit(active, row, diskBytes, quota));
    } catch (e) {
      if (e instanceof HutchError) throw e;
      if (/UNIQUE/.test((e as Error).message)) throw nameTaken(row);
      throw e;
    } finally {
      this.usersWaiting--;
    }
  }

  /** Records `fields` on a machine that starts holding resources again (a box started), if it fits. */
  async update(row: MachineRow, fields: Partial<Omit<MachineRow, 'id'>>, quota?: Quota): Promise<void> {
    this.usersWaiting++;
    try {
      await this.yieldFor(row.memory_mb);
      this.store.admitUpdate(row.id, fields, (active) => this.admit(active, row, 0, quota));
    } finally {
      this.usersWaiting--;
    }
  }

  /**
   * `diskBytes` is the new machine's disk size, promised against the host's free space; 0 when
   * its disk already exists (a box starting again).
   */
  private admit(active: MachineRow[], row: MachineRow, diskBytes: number, quota?: Quota): void {
    const over = this.overCaps(active, row.memory_mb);
    if (over) throw new HutchError('RESOURCE_EXHAUSTED', over);
    if (quota) {
      const mine = active.filter((r) => r.owner === row.owner);
      if (quota.maxActive !== undefined && mine.length + 1 > quota.maxActive)
        throw new HutchError(
          'RESOURCE_EXHAUSTED',
          `your quota allows ${quota.maxActive} running machines and boxes`,
        );
      const used = mine.reduce((s, r) => s + r.memory_mb, 0);
      if (quota.maxMemoryMb !== undefined && used + row.memory_mb > quota.maxMemoryMb)
        throw new HutchError(
          'RESOURCE_EXHAUSTED',
          `your quota allows ${quota.maxMemoryMb} MiB of guest memory (${used} MiB in use + ${row.memory_mb} MiB requested)`,
        );
      const cpus = mine.reduce((s, r) => s + r.vcpus, 0);
      if (quota.maxVcpus !== undefined && cpus + row.vcpus > quota.maxVcpus)
        throw new HutchError(
          'RESOURCE_EXHAUSTED',
          `your quota allows ${quota.maxVcpus} vCPUs (${cpus} in use + ${row.vcpus} requested)`,
        );
    }
    if (diskBytes > 0) checkDiskRoom(this.diskRoom(), diskBytes, `${row.kind} ${row.id}`);
  }

  /** Why one more QEMU of `memoryMb` would break a cap beside `active` (and our other QEMUs). */
  private overCaps(active: MachineRow[], memoryMb: number): string | undefined {
    const extra = this.others.count();
    const extraMb = extra * this.config.machineMemoryMb;
    if (active.length + extra + 1 > this.config.maxMachines)
      return `at most ${this.config.maxMachines} machines may run at once (${active.length} running${extra ? `, ${extra} warm or being snapshotted` : ''})`;
    const used = active.reduce((s, r) => s + r.memory_mb, 0) + extraMb;
    if (used + memoryMb > this.config.maxGuestMemoryMb)
      return `guest memory cap reached: ${used} MiB in use + ${memoryMb} MiB requested > ${this.config.maxGuestMemoryMb} MiB`;
    return undefined;
  }

  /** Whether one more QEMU of `memoryMb` fits under the caps, counting every QEMU we run. */
  hasRoomFor(memoryMb: number): boolean {
    return this.overCaps(this.store.activeRows(), memoryMb) === undefined;
  }

  /**
   * Makes room for a user's machine by giving back pooled ones: the pool only ever holds what
   * no user is asking for.
   */
  private async yieldFor(memoryMb: number): Promise<void> {
    for (let i = 0; i < 64 && !this.hasRoomFor(memoryMb); i++) if (!(await this.others.yieldOne())) return;
  }

  /** Guest disk promised against the state filesystem's free space (reported by /v1/info). */
  diskRoom(): DiskRoom {
    const claims: DiskClaim[] = [];
    // A failed machine's run dir is gone; a failed box is stopped and keeps its disk.
    for (const r of this.store.list())
      if (!(r.kind === 'machine' && r.state === 'failed'))
        claims.push({ virtualBytes: this.diskBytesOf(r), file: join(r.run_dir, 'disk.qcow2') });
    claims.push(...this.others.claims());
    claims.push(...this.diskClaims());
    return diskRoom(this.config.stateDir, claims, this.config.diskOvercommit);
  }

  /** Whether a disk of `bytes` may be promised now. */
  diskFits(bytes: number): boolean {
    try {
      checkDiskRoom(this.diskRoom(), bytes, 'a pooled machine');
      return true;
    } catch {
      return false;
    }
  }

  /** How big a machine's disk may grow: a box's asked-for size, else its template's image. */
  diskBytesOf(row: MachineRow): number {
    if (row.kind === 'box') return boxSpecOf(row).disk_size_gb * 1024 ** 3;
    const manifest = this.templates.get(row.template);
    if (!manifest) return 0;
    try {
      return statSync(manifest.rootfs).size;
    } catch {
      return 0;
    }
  }
}

/** MemAvailable from /proc/meminfo, MiB. */
export function hostMemAvailableMb(): number {
  try {
    const m = existsSync('/proc/meminfo')
      ? /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'))
      : null;
    return m?.[1] ? Number(m[1]) / 1024 : Number.POSITIVE_INFINITY;
  } catch {
    return Number.POSITIVE_INFINITY;
  }
}

/** The insert lost a race for its name (the other create checked first, then inserted first). */
function nameTaken(row: MachineRow): HutchError {
  return new HutchError(
    'NAME_TAKEN',
    `the name ${JSON.stringify(row.name)} was just given to another of your machines or boxes`,
  );
}
