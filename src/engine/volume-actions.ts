import type { Readable } from 'node:stream';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';
import type { GuestOps } from '../guest/guest-ops.js';
import type {
  FileView,
  SaveView,
  VolumeFile,
  VolumeService,
  VolumeView,
} from '../storage/volumes/volume-service.js';
import type { MachineView } from './machine-view.js';

/** What the volume actions need of the engine's machines. */
export interface VolumeMachines {
  openSession(p: Principal, idOrName: string): Promise<GuestOps>;
  destroy(p: Principal, idOrName: string): Promise<void>;
  get(p: Principal, idOrName: string): MachineView;
  /** Why a full host disk stopped the machine's vCPUs (src/engine/disk-pauses.ts), if it did. */
  diskPaused(id: string): string | undefined;
}

/** How often a save or restore looks whether a full host disk stopped its machine. */
const pauseCheckMs = 500;

/**
 * The engine's volume actions (storage/volumes/ holds the volumes): each for the caller's own
 * volumes (another owner's is VOLUME_NOT_FOUND) and, for save and restore, the caller's own
 * machine. Engine's methods of the same names delegate here.
 */
export class VolumeActions {
  constructor(
    private readonly service: VolumeService | undefined,
    private readonly machines: VolumeMachines,
  ) {}

  private svc(): VolumeService {
    if (!this.service) throw new HutchError('NOT_SERVED', 'persistent volumes are not served by this daemon');
    return this.service;
  }

  createVolume(p: Principal, req: { ttlSeconds?: number }): Promise<VolumeView> {
    return this.svc().create(p.user, req.ttlSeconds);
  }

  async listVolumes(p: Principal): Promise<VolumeView[]> {
    return this.svc().list(p.user);
  }

  getVolume(p: Principal, id: string): Promise<VolumeView> {
    return this.svc().get(p.user, id);
  }

  deleteVolume(p: Principal, id: string): Promise<void> {
    return this.svc().delete(p.user, id);
  }

  listVolumeFiles(p: Principal, id: string): Promise<FileView[]> {
    return this.svc().files(p.user, id);
  }

  putVolumeFile(
    p: Principal,
    id: string,
    path: string | undefined,
    body: Readable,
    opts: { mode?: number; size?: number },
  ): Promise<{ path: string; size: number; volume: VolumeView }> {
    return this.svc().putFile(p.user, id, path, body, opts);
  }

  getVolumeFile(p: Principal, id: string, path: string | undefined): Promise<VolumeFile> {
    return this.svc().openFile(p.user, id, path);
  }

  /** The caller's running machine's /root as the volume's new version. */
  async saveMachine(p: Principal, idOrName: string, volume: string): Promise<SaveView & { machine: string }> {
    const svc = this.svc();
    // The volume first: a wrong id is answered without touching the machine.
    await svc.get(p.user, volume);
    const ops = await this.machines.openSession(p, idOrName);
    const saving = this.unlessDiskPaused(ops.id, (signal) => svc.save(p.user, volume, ops, signal));
    // The session is the machine's until the guest's tar has really ended.
    saving.settled.finally(() => ops.release());
    return { ...(await saving.answer), machine: ops.id };
  }

  /**
   * Runs work that needs the guest's vCPUs. If a full host disk stops them meanwhile, the guest
   * would only continue once space is freed: the caller is answered STORAGE_FULL at once, the
   * work is told to give up (a save then never commits), and `settled` says when it has ended.
   */
  private unlessDiskPaused<T>(
    id: string,
    work: (signal: AbortSignal) => Promise<T>,
  ): { answer: Promise<T>; settled: Promise<unknown> } {
    const ac = new AbortController();
    const running = work(ac.signal);
    let timer: NodeJS.Timeout | undefined;
    const paused = new Promise<never>((_, reject) => {
      timer = setInterval(() => {
        const cause = this.machines.diskPaused(id);
        if (!cause) return;
        const e = new HutchError('STORAGE_FULL', `machine ${id} is ${cause}`);
        ac.abort(e);
        reject(e);
      }, pauseCheckMs);
    });
    const settled = running.then(
      () => undefined,
      () => undefined,
    );
    settled.finally(() => clearInterval(timer));
    // Whichever loses the race is handled here: no unhandled rejection.
    paused.catch(() => {});
    return { answer: Promise.race([running, paused]), settled };
  }

  /**
   * A create with a volume: the volume is checked (and pinned) before the machine is made, and
   * restored into its /root before the create answers. A restore that fails ends the machine
   * and its error is the create's.
   */
  async createWithVolume(
    p: Principal,
    volume: string,
    create: () => Promise<MachineView>,
  ): Promise<MachineView> {
    const svc = this.svc();
    const lease = await svc.lease(p.user, volume);
    try {
      const m = await create();
      try {
        const ops = await this.machines.openSession(p, m.id);
        const restoring = this.unlessDiskPaused(m.id, () => svc.restore(lease, ops));
        restoring.settled.finally(() => ops.release());
        await restoring.answer;
      } catch (e) {
        await this.machines.destroy(p, m.id).catch(() => {});
        throw e;
      }
      return this.machines.get(p, m.id);
    } finally {
      lease.release();
    }
  }
}
