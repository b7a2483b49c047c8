import { posix } from 'node:path';
import type { Config } from '../config.js';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';
import { AgentError } from '../guest/agent-types.js';
import { type Disks, newDiskId } from '../storage/disks/disk-service.js';
import type { AttachmentRow, DiskRow } from '../storage/disks/disk-store.js';
import { diskQmpArgs, maxDisks } from '../vmm/machine-spec.js';
import type { FlowContext } from './flows/context.js';
import { resumeMachine } from './flows/suspend.js';
import type { Machine } from './machine.js';
import type { MachineRow } from './store.js';

/** A disk as the APIs show it (gRPC DiskInfo, REST /v1/disks). */
export interface DiskView {
  disk_id: string;
  name: string;
  size_bytes: number;
  /** Bytes the disk holds on the host (what guests wrote), at most size_bytes. */
  used_bytes: number;
  /** `attached` while any machine has it, else `ready`. */
  status: 'ready' | 'attached';
  worker_id: string;
  created_at: string;
  attachments: { vm_id: string; vm_name: string; mount_path: string; mount_mode: 'ro' | 'rw' }[];
}

export interface AttachRequest {
  disk: string;
  vm: string;
  mountPath: string;
  readOnly: boolean;
  /** Which API names the VM: its machines API finds only machines, the boxes API only boxes. */
  kind?: MachineRow['kind'];
}

const defaultDiskBytes = 10 * 2 ** 30;
const minDiskBytes = 64 * 2 ** 20;
/** Where a disk may not be mounted: the guest's own system trees (and the agent's /run/hutch). */
const reservedMounts = [
  '/',
  '/proc',
  '/sys',
  '/dev',
  '/run',
  '/boot',
  '/bin',
  '/sbin',
  '/lib',
  '/usr',
  '/etc',
];
/** Kernel and agent trees: nothing may be mounted anywhere under them. */
const pseudoTrees = ['/proc', '/sys', '/dev', '/run'];

/**
 * The engine's disk actions: who may make, attach, detach and destroy which disk, and the
 * hot-plug itself (QMP blockdev-add + device_add of a SCSI disk, then the agent's DISK_MOUNT;
 * the reverse to detach). Each attach or detach holds its machine's lock and its disk's.
 * Engine's methods of the same names delegate here.
 */
export class DiskActions {
  constructor(
    private readonly cx: FlowContext,
    private readonly config: Config,
    private readonly disks: Disks,
    /** The caller's machine or box (`kind` absent: either), else MACHINE_/BOX_NOT_FOUND. */
    private readonly findVm: (p: Principal, idOrName: string, kind?: MachineRow['kind']) => MachineRow,
  ) {}

  private get rt() {
    return this.cx.rt;
  }

  async createDisk(p: Principal, req: { name: string; sizeBytes: number }): Promise<DiskView> {
    const name = req.name;
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(name))
      throw new HutchError(
        'INVALID_ARGUMENT',
        `disk name ${JSON.stringify(name)}: 1-63 of [A-Za-z0-9._-], starting with a letter or digit`,
      );
    let size = req.sizeBytes === 0 ? defaultDiskBytes : req.sizeBytes;
    if (!Number.isSafeInteger(size) || size < minDiskBytes || size > this.config.diskMaxBytes)
      throw new HutchError(
        'INVALID_ARGUMENT',
        `size_bytes ${req.sizeBytes}: between ${minDiskBytes} (64 MiB) and ${this.config.diskMaxBytes} (HUTCH_DISK_MAX_BYTES); 0 means ${defaultDiskBytes}`,
      );
    size = Math.ceil(size / 2 ** 20) * 2 ** 20;
    if (this.disks.store.byName(p.user, name))
      throw new HutchError('DISK_NAME_TAKEN', `you already have a disk named ${JSON.stringify(name)}`);
    const committed = this.disks.store.committedBytes(p.user);
    if (committed + size > this.config.diskQuotaBytes)
      throw new HutchError(
        'RESOURCE_EXHAUSTED',
        `a disk of ${size} bytes would bring your disks to ${committed + size} bytes; your quota is ${this.config.diskQuotaBytes} (HUTCH_DISK_QUOTA_BYTES)`,
      );
    const id = newDiskId();
    let path: string;
    try {
      path = await this.disks.files.create(id, size, name);
    } catch (e) {
      const msg = (e as Error).message;
      if (/ENOSPC|No space/i.test(msg))
        throw new HutchError('STORAGE_FULL', `no room on the host for the disk's filesystem: ${msg}`);
      throw e;
    }
    try {
      this.disks.store.insert({
        id,
        owner: p.user,
        name,
        size_bytes: size,
        path,
        format: 'raw',
        created_at: Date.now(),
        clone_of: null,
      });
    } catch (e) {
      this.disks.files.remove(path);
      if (String((e as Error).message).includes('UNIQUE'))
        throw new HutchError('DISK_NAME_TAKEN', `you already have a disk named ${JSON.stringify(name)}`);
      throw e;
    }
    return this.view(this.disks.store.get(id) as DiskRow);
  }

  listDisks(p: Principal): DiskView[] {
    return this.disks.store.list(p.user).map((d) => this.view(d));
  }

  /** The disks attached to the caller's machine or box. */
  disksOf(p: Principal, idOrName: string, kind?: MachineRow['kind']): DiskView[] {
    const row = this.findVm(p, idOrName, kind);
    return this.disks.attachmentsOf(row.id).flatMap((a) => {
      const d = this.disks.get(a.disk_id);
      return d ? [this.view(d)] : [];
    });
  }

  getDisk(p: Principal, idOrName: string): DiskView {
    return this.view(this.find(p, idOrName));
  }

  async destroyDisk(p: Principal, idOrName: string): Promise<void> {
    const d = this.find(p, idOrName);
    await this.disks.withDisk(d.id, async () => {
      const atts = this.disks.store.attachmentsOfDisk(d.id);
      if (atts.length)
        throw new HutchError(
          'DISK_ATTACHED',
          `disk ${d.id} is attached to ${atts.map((a) => a.machine_id).join(', ')}: detach it first`,
        );
      this.disks.store.delete(d.id);
      this.disks.files.remove(d.path);
    });
  }

  /**
   * Plugs the disk into the running machine (a suspended one is woken first) and mounts it at
   * `mountPath` before answering. Read-write: on no other machine at all; read-only: on any
   * number, none of them read-write.
   */
  async attachDisk(p: Principal, req: AttachRequest): Promise<DiskView> {
    const d = this.find(p, req.disk);
    const mountPath = checkMountPath(req.mountPath);
    const first = this.findVm(p, req.vm, req.kind);
    const m = this.rt.machine(first);
    await m.lock.run(() =>
      this.disks.withDisk(d.id, async () => {
        const row = await this.runningRow(m, first);
        const atts = this.disks.store.attachmentsOfDisk(d.id);
        if (atts.some((a) => a.machine_id === row.id))
          throw new HutchError('DISK_ATTACHED', `disk ${d.id} is attached to ${row.id} already`);
        const rw = atts.find((a) => a.read_only === 0);
        if (rw)
          throw new HutchError(
            'DISK_ATTACHED',
            `disk ${d.id} is attached read-write to ${rw.machine_id}: a disk attached read-write is on one machine only`,
          );
        if (!req.readOnly && atts.length)
          throw new HutchError(
            'DISK_ATTACHED',
            `disk ${d.id} is attached read-only to ${atts.map((a) => a.machine_id).join(', ')}: detach it there to attach it read-write`,
          );
        const mine = this.disks.store.attachmentsOf(row.id);
        if (mine.some((a) => a.mount_path === mountPath))
          throw new HutchError('INVALID_ARGUMENT', `${row.id} has a disk mounted at ${mountPath} already`);
        const used = new Set(mine.map((a) => a.target));
        let target = 0;
        while (used.has(target)) target++;
        if (target >= maxDisks)
          throw new HutchError(
            'INVALID_ARGUMENT',
            `${row.id} has ${maxDisks} disks attached: the most a machine takes`,
          );
        await this.plug(m, row, d, { target, mountPath, readOnly: req.readOnly });
      }),
    );
    return this.view(this.disks.store.get(d.id) as DiskRow);
  }

  /**
   * Unmounts the disk in the guest (written back; refused, with nothing changed, while a process
   * has files open there), unplugs it and forgets the attachment. A stopped box's attachment is
   * just forgotten (nothing is plugged in).
   */
  async detachDisk(
    p: Principal,
    req: { disk: string; vm: string; kind?: MachineRow['kind'] },
  ): Promise<DiskView> {
    const d = this.find(p, req.disk);
    const first = this.findVm(p, req.vm, req.kind);
    const m = this.rt.machine(first);
    await m.lock.run(() =>
      this.disks.withDisk(d.id, async () => {
        const a = this.disks.store.attachmentsOf(first.id).find((x) => x.disk_id === d.id);
        if (!a) throw new HutchError('DISK_NOT_ATTACHED', `disk ${d.id} is not attached to ${first.id}`);
        let row = this.rt.store.get(first.id) as MachineRow;
        if (row.state === 'suspended') row = (await resumeMachine(this.cx, m)).row;
        if (row.state === 'running') await this.unplug(m, row, a);
        this.disks.store.detach(d.id, row.id);
      }),
    );
    return this.view(this.disks.store.get(d.id) as DiskRow);
  }

  private async runningRow(m: Machine, first: MachineRow): Promise<MachineRow> {
    let row = this.rt.store.get(first.id);
    if (!row) throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(first.id)}`);
    if (row.state === 'suspended') row = (await resumeMachine(this.cx, m)).row;
    this.rt.agentOf(row); // throws the right "not running" error
    return row;
  }

  private async plug(
    m: Machine,
    row: MachineRow,
    d: DiskRow,
    at: { target: number; mountPath: string; readOnly: boolean },
  ): Promise<void> {
    const agent = this.rt.agentOf(row);
    if (!agent.supports('disks'))
      throw new HutchError(
        'NOT_SUPPORTED',
        `${row.id}'s agent cannot mount disks (protocol ${agent.features.version}); its image needs a newer agent`,
      );
    const a: AttachmentRow = {
      disk_id: d.id,
      machine_id: row.id,
      mount_path: at.mountPath,
      read_only: at.readOnly ? 1 : 0,
      target: at.target,
      created_at: Date.now(),
    };
    // Recorded first: a daemon that dies mid-way knows the disk may be plugged in there, and a
    // detach (which tolerates a half-made attachment) cleans it up.
    this.disks.store.attach(a);
    const qmp = await this.rt.qmpOf(m);
    const args = diskQmpArgs({ path: d.path, format: d.format, target: at.target, readOnly: at.readOnly });
    let plugged = false;
    try {
      await qmp.execute('blockdev-add', args.blockdev);
      try {
        await qmp.execute('device_add', args.device);
        plugged = true;
      } catch (e) {
        await qmp.execute('blockdev-del', { 'node-name': args.blockdev['node-name'] }).catch(() => {});
        throw e;
      }
      await agent.mountDisk({ target: at.target, path: at.mountPath, readOnly: at.readOnly });
    } catch (e) {
      if (plugged) await this.unplugDevice(m, at.target).catch(() => {});
      this.disks.store.detach(d.id, row.id);
      throw mountError(e, d, row, at.mountPath);
    }
  }

  private async unplug(m: Machine, row: MachineRow, a: AttachmentRow): Promise<void> {
    const agent = this.rt.agentOf(row);
    try {
      await agent.unmountDisk({ target: a.target, path: a.mount_path });
    } catch (e) {
      if (e instanceof AgentError && e.code === 'EBUSY')
        throw new HutchError(
          'DISK_BUSY',
          `a process in ${row.id} has files open under ${a.mount_path}: close them (or stop it) and detach again`,
        );
      // Not mounted (a half-made attach, or unmounted by hand in the guest), or the guest
      // dropped the device itself: unplug anyway.
      if (!(e instanceof AgentError && (e.code === 'EINVAL' || e.code === 'ENODEV'))) throw e;
    }
    await this.unplugDevice(m, a.target);
  }

  /** SCSI unplug is immediate in QEMU (no guest handshake), so the node is free right after. */
  private async unplugDevice(m: Machine, target: number): Promise<void> {
    const qmp = await this.rt.qmpOf(m);
    const name = `disk${target}`;
    await qmp.execute('device_del', { id: name }).catch((e: Error) => {
      if (!/not found/i.test(e.message)) throw e;
    });
    for (let i = 0; ; i++) {
      try {
        await qmp.execute('blockdev-del', { 'node-name': name });
        return;
      } catch (e) {
        const msg = (e as Error).message;
        if (/cannot find|not found/i.test(msg)) return;
        if (i >= 50) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  private find(p: Principal, idOrName: string): DiskRow {
    const d = this.disks.store.get(idOrName) ?? this.disks.store.byName(p.user, idOrName);
    if (!d || d.owner !== p.user)
      throw new HutchError('DISK_NOT_FOUND', `no disk ${JSON.stringify(idOrName)}`);
    return d;
  }

  private view(d: DiskRow): DiskView {
    const atts = this.disks.store.attachmentsOfDisk(d.id);
    return {
      disk_id: d.id,
      name: d.name,
      size_bytes: d.size_bytes,
      used_bytes: Math.min(d.size_bytes, this.disks.files.usedBytes(d.path)),
      status: atts.length ? 'attached' : 'ready',
      worker_id: this.disks.workerId,
      created_at: new Date(d.created_at).toISOString(),
      attachments: atts.map((a) => ({
        vm_id: a.machine_id,
        vm_name: this.rt.store.get(a.machine_id)?.name ?? '',
        mount_path: a.mount_path,
        mount_mode: a.read_only ? 'ro' : 'rw',
      })),
    };
  }
}

/** An absolute, normalised mount path outside the guest's system trees. */
function checkMountPath(path: string): string {
  if (typeof path !== 'string' || !path.startsWith('/') || path.length > 200 || /[\0\n]/.test(path))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `mount_path ${JSON.stringify(path)}: an absolute path of at most 200 bytes`,
    );
  const norm = posix.normalize(path).replace(/\/+$/, '') || '/';
  if (norm !== path.replace(/\/+$/, '') || path.split('/').includes('..'))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `mount_path ${JSON.stringify(path)}: must be normalised (no '.', '..' or '//')`,
    );
  for (const r of reservedMounts)
    if (norm === r || (pseudoTrees.includes(r) && norm.startsWith(`${r}/`)))
      throw new HutchError(
        'INVALID_ARGUMENT',
        `mount_path ${norm}: not on the guest's system directories (${reservedMounts.join(' ')})`,
      );
  return norm;
}

function mountError(e: unknown, d: DiskRow, row: MachineRow, path: string): Error {
  if (e instanceof HutchError) return e;
  if (e instanceof AgentError)
    return new HutchError(
      'EXEC_FAILED',
      `disk ${d.id} could not be mounted at ${path} in ${row.id}: ${e.code} ${e.message}`,
    );
  return new HutchError(
    'INTERNAL',
    `disk ${d.id} could not be attached to ${row.id}: ${(e as Error).message}`,
  );
}
