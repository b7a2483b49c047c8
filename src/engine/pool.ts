import { statSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config.js';
import type { Principal } from '../core/principal.js';
import { screenText } from '../desktop/screen-size.js';
import { HutchError } from '../errors.js';
import type { TemplateManifest } from '../images/builder.js';
import type { SnapshotCache, TemplateSnapshot } from '../images/snapshots.js';
import type { EgressRules } from '../net/egress.js';
import { type Admission, hostMemAvailableMb, type OtherQemus } from './admission.js';
import { newRow } from './flows/context.js';
import { newMachineId } from './ids.js';
import { Machine, type Registry } from './machine.js';
import type { Runtime } from './runtime.js';
import type { MachineRow } from './store.js';

/** A restored, warmed, paused machine waiting to be handed out by a create. */
interface Pooled {
  row: MachineRow;
  m: Machine;
}

/**
 * Machines restored ahead of demand, per template, paused, made as that template's create makes
 * them by default (a desktop with its network, attached for no one until it is handed out).
 * The pool never takes what users could have: its QEMUs count against the caps, it gives them
 * back to a user's create that needs the room, and it stops growing when the host runs short of
 * memory.
 */
export class WarmPool implements OtherQemus {
  private readonly pool = new Map<string, Pooled[]>();
  private making = 0;
  /** The refill under way, if any (close() waits for it, so no half-made pool machine is left). */
  private refilling: Promise<void> | undefined;
  private again = false;

  constructor(
    private readonly rt: Runtime,
    private readonly config: Config,
    private readonly templates: Map<string, TemplateManifest>,
    private readonly snapshots: SnapshotCache,
    private readonly admission: Admission,
    private readonly registry: Registry,
  ) {}

  /**
   * Pooled machines being ended: out of the lists, but their QEMU runs until the end is done, so
   * they still count against the caps (and a user who needs their room waits for them).
   */
  private readonly discards = new Set<Promise<void>>();

  count(): number {
    let n = this.making + this.snapshots.inFlight() + this.discards.size;
    for (const l of this.pool.values()) n += l.length;
    return n;
  }

  claims(): { virtualBytes: number; file: string }[] {
    const out: { virtualBytes: number; file: string }[] = [];
    for (const l of this.pool.values())
      for (const p of l)
        out.push({
          virtualBytes: this.admission.diskBytesOf(p.row),
          file: join(p.row.run_dir, 'disk.qcow2'),
        });
    return out;
  }

  async yieldOne(): Promise<boolean> {
    const victim = [...this.pool.values()].find((l) => l.length > 0)?.pop();
    if (victim) {
      await this.discard(victim);
      return true;
    }
    if (this.discards.size > 0) {
      await Promise.race(this.discards);
      return true;
    }
    if (this.refilling && this.making > 0) {
      await this.refilling;
      return true;
    }
    return false;
  }

  /** The pool's state per template, for /healthz. */
  status(): Record<string, { ready: number; target: number }> {
    const out: Record<string, { ready: number; target: number }> = {};
    for (const name of this.templates.keys())
      out[name] = { ready: this.pool.get(name)?.length ?? 0, target: this.config.poolSize };
    return out;
  }

  /** Removes and returns a pooled machine: once taken it is in no list, so it is never served twice. */
  take(template: string): Pooled | undefined {
    return this.pool.get(template)?.shift();
  }

  /**
   * Turns a pooled machine into the caller's: admit it, give a networked one the caller's egress
   * rules and network, continue it, give it its identity. `fields` are the caller's (name,
   * lifetime); `net`, for a networked one, the caller's rules and the network it asked for.
   */
  async handOut(
    p: Pooled,
    principal: Principal,
    fields: Pick<
      MachineRow,
      'name' | 'persistent' | 'ttl_seconds' | 'created_at' | 'expires_at' | 'auto_suspend_seconds'
    >,
    t0: number,
    net?: { rules: EgressRules; networkId?: string | undefined },
  ): Promise<MachineRow> {
    const row: MachineRow = {
      ...p.row,
      ...fields,
      owner: principal.user,
      state: 'starting',
      mode: 'pool',
      pid: p.m.vm?.pid ?? null,
    };
    try {
      this.admission.insertNow(row, this.admission.diskBytesOf(row), principal.quota);
    } catch (e) {
      await this.discard(p);
      throw e;
    }
    this.registry.add(p.m);
    try {
      return await p.m.lock.run(async () => {
        try {
          const nm = this.rt.d.net;
          if (p.row.net) {
            if (!nm || !net) throw new Error('a networked pooled machine handed out without its network');
            if (net.networkId) nm.directory.setNetwork(row.id, net.networkId);
            await nm.handTo(row.id, row.run_dir, row.owner, net.rules);
          }
          const qmp = await this.rt.qmpOf(p.m);
          await qmp.execute('cont');
          const agent = p.m.vm?.agent;
          if (!agent) throw new Error('pooled machine lost its agent');
          await this.rt.giveIdentity(agent, row.id);
          return this.rt.markRunning(p.m, Math.round(performance.now() - t0));
        } catch (e) {
          await this.rt.end(p.m, 'deleted');
          throw new HutchError('BOOT_FAILED', `pooled machine did not start: ${(e as Error).message}`);
        }
      });
    } finally {
      // After the hand-out, not before: the refill's restore must not delay this create.
      setImmediate(() => this.rt.background('pool refill', {}, () => this.refill()));
    }
  }

  /** Room for one more pooled machine (it stops growing when the host runs short of memory). */
  private hasRoom(manifest: TemplateManifest): boolean {
    const { memoryMb } = this.rt.templateSize(manifest.name);
    if (this.admission.usersWaiting > 0 || !this.admission.hasRoomFor(memoryMb)) return false;
    if (hostMemAvailableMb() <= memoryMb + 1024) return false;
    try {
      return this.admission.diskFits(statSync(manifest.rootfs).size);
    } catch {
      return false;
    }
  }

  refill(): void {
    if (this.rt.d.closing() || this.config.poolSize === 0) return;
    // Asked for during a refill (a snapshot became ready after the refill passed its template):
    // one more pass once this one ends.
    if (this.refilling) {
      this.again = true;
      return;
    }
    this.again = false;
    this.refilling = this.refillNow().finally(() => {
      this.refilling = undefined;
      if (this.again) this.refill();
    });
  }

  private async refillNow(): Promise<void> {
    for (const manifest of this.templates.values()) {
      const net = this.rt.templateNet(manifest.name);
      const snap = this.snapshots.get(manifest, this.rt.snapshotParams(manifest, undefined, false, net));
      if (!snap) continue;
      const list = this.pool.get(manifest.name) ?? [];
      this.pool.set(manifest.name, list);
      while (list.length < this.config.poolSize && !this.rt.d.closing() && this.hasRoom(manifest)) {
        this.making++;
        try {
          list.push(await this.make(manifest, snap, net));
        } catch (e) {
          this.rt.d.log('warn', 'pool refill failed', {
            template: manifest.name,
            error: (e as Error).message,
          });
          return;
        } finally {
          this.making--;
        }
      }
    }
  }

  /**
   * Restores a machine from the template snapshot and runs one command in it before parking it
   * paused: under TCG a fresh restore spends ~140 ms re-translating guest code on its first
   * command, which the user of a pooled machine should not pay.
   */
  private async make(manifest: TemplateManifest, snap: TemplateSnapshot, net: boolean): Promise<Pooled> {
    const id = newMachineId();
    const size = this.rt.templateSize(manifest.name);
    const row = newRow(this.rt.d.runRoot, {
      id,
      owner: '',
      name: null,
      template: manifest.name,
      template_hash: manifest.hash,
      mode: 'pool',
      accel: this.rt.d.accel.accel,
      vcpus: size.vcpus,
      memory_mb: size.memoryMb,
      persistent: 0,
      ttl_seconds: null,
      created_at: new Date().toISOString(),
      expires_at: null,
      kind: 'machine',
      net: net ? 1 : 0,
      display: screenOf(this.rt.templateScreen(manifest.name)),
    });

    const m = new Machine(id, row.run_dir);
    try {
      this.rt.own(m, 'machine');
      await this.rt.d.hv.createOverlay(snap.disk, join(row.run_dir, 'disk.qcow2'), 'qcow2', this.rt.d.runAs);
      const { vm } = await this.rt.restoreInto(m, row, manifest, snap.state, {
        memoryFrom: snap.mem,
        fromSnapshot: true,
        ignoreShared: true,
        layout: snap.layout,
      });
      // Warm both paths a hand-out takes: an exec, and the identity step (overwritten then).
      await vm.agent?.execCollect({ argv: ['true'] }, { maxOutputBytes: 1024 });
      if (vm.agent) await this.rt.giveIdentity(vm.agent, id);
      await (await this.rt.qmpOf(m)).execute('stop');
      row.jail = JSON.stringify(vm.jail ?? null);
      return { row, m };
    } catch (e) {
      await this.rt.end(m, 'deleted');
      throw e;
    }
  }

  private async discard(p: Pooled): Promise<void> {
    const ending = this.rt.end(p.m, 'deleted');
    this.discards.add(ending);
    try {
      await ending;
    } finally {
      this.discards.delete(ending);
    }
  }

  /** Gives back pooled machines when the host runs short of memory. */
  shrinkUnderPressure(): void {
    if (hostMemAvailableMb() > this.config.machineMemoryMb + 512) return;
    for (const list of this.pool.values()) {
      const p = list.pop();
      if (p) {
        this.rt.d.log('warn', 'memory pressure: shrinking the warm pool', { id: p.row.id });
        this.rt.background('pool discard', { id: p.row.id }, () => this.discard(p));
        return;
      }
    }
  }

  /** Pooled machines belong to no one: they go with the daemon (a restart would kill them anyway). */
  async close(): Promise<void> {
    await this.refilling;
    for (const list of this.pool.values()) await Promise.all(list.splice(0).map((p) => this.discard(p)));
  }
}

function screenOf(s: { width: number; height: number } | undefined): string | null {
  return s ? screenText(s) : null;
}
