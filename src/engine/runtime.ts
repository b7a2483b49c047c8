import { existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { inBackground, type Log } from '../background.js';
import type { Config } from '../config.js';
import { defaultScreen, parseScreen, type ScreenSize, screenText } from '../desktop/screen-size.js';
import { HutchError, orStorageFull } from '../errors.js';
import type { AgentConnection } from '../guest/agent-connection.js';
import { configureGuest, type GuestVolume } from '../guest/guest-setup.js';
import type { TemplateManifest } from '../images/builder.js';
import { templateRecipes, templateSize } from '../images/recipes.js';
import type { SnapshotParams } from '../images/snapshots.js';
import { inside } from '../net/addressing.js';
import type { NetworkManager } from '../net/network-manager.js';
import type { DiskDevice, Disks } from '../storage/disks/disk-service.js';
import type { AccelChoice } from '../vmm/accel.js';
import { machineLimits } from '../vmm/cgroup.js';
import { tcgTimingArgs } from '../vmm/host.js';
import type { GuestLink, Hypervisor, Qmp } from '../vmm/hypervisor.js';
import {
  allocate,
  checkSameLayout,
  type Layout,
  layoutOf,
  type MachineSpec,
  standardMachine,
} from '../vmm/machine-spec.js';
import type { CopyOptions } from '../vmm/memory-file.js';
import type { MachineSave } from '../vmm/migration.js';
import { type Accel, runPaths, type VmSpec } from '../vmm/qemu.js';
import { prepareRunDir } from '../vmm/run-dir.js';
import { prepareEmptyVolume, type Volume } from '../vmm/volumes.js';
import type { BoxExecs } from './box-execs.js';
import { ends } from './cleanup-stack.js';
import type { DiskPauses } from './disk-pauses.js';
import { checkTransition, type LifecycleEvent } from './lifecycle.js';
import type { Machine, Registry, Vm } from './machine.js';
import type { MachineView } from './machine-view.js';
import type { MachineRow, Store } from './store.js';

/** A template's startup (a desktop under TCG takes ~30 s to come up); past it the boot fails. */
const startupTimeoutMs = 180_000;

/** What CONFIGURE gives a networked guest's NIC: the same in every guest (net/addressing.ts). */
export const guestNet = {
  address: inside.guest,
  prefix: inside.prefix,
  gateway: inside.gateway,
  mtu: inside.mtu,
  dns: inside.dns,
};

const agentBackoffMs = 250;
const agentBackoffMaxMs = 30_000;
const agentHealthyMs = 10_000;
/** A guest that breaks its link this many times in a row has its machine failed. */
const agentMaxFailures = 16;

export interface RunAs {
  user: string;
  uid: number;
  gid: number;
}

export interface RuntimeDeps {
  config: Config;
  store: Store;
  hv: Hypervisor;
  guest: GuestLink;
  log: Log;
  accel: AccelChoice;
  registry: Registry;
  runRoot: string;
  runAs: RunAs | undefined;
  execs: BoxExecs;
  diskPauses: () => DiskPauses;
  closing: () => boolean;
  /** Serves a guest's API connection (its `hutch`) for the machine's owner; absent: refused. */
  onGuestApiStream?: GuestApiStreamHandler | undefined;
  /** Guest networks (src/net/); absent: machines asking for a network are refused. */
  net?: NetworkManager | undefined;
  /** Attachable disks (src/storage/disks/); absent: no machine has any. */
  disks?: Disks | undefined;
}

/** Takes the API connection a process inside `machineId` opened, to serve it for `owner`. */
export type GuestApiStreamHandler = (machineId: string, owner: string, stream: Duplex) => void;

/**
 * What every flow does to one machine: launch and adopt its VM (registering each resource's
 * undo on the machine's cleanup stack), restore it, reach its agent and QMP, move it through the
 * lifecycle table, watch it, and end it. Flows (create, branch, suspend, stop/start, pool) are
 * sequences of these steps under the machine's lock.
 */
export class Runtime {
  constructor(readonly d: RuntimeDeps) {}

  get store(): Store {
    return this.d.store;
  }

  /** The machine's object (made on first use: a new insert, a row found after a restart). */
  machine(row: MachineRow): Machine {
    return this.d.registry.ensure(row.id, row.run_dir);
  }

  /**
   * Moves the machine along the lifecycle table (engine/lifecycle.ts), recording the new state
   * with `fields`; throws the user-facing error when `event` is not allowed in its state now.
   * Callers hold the machine's lock.
   */
  transition(id: string, event: LifecycleEvent, fields: Partial<Omit<MachineRow, 'id'>> = {}): MachineRow {
    const row = this.store.get(id);
    if (!row) throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(id)}`);
    const state = checkTransition(row, event);
    if (state !== row.state || Object.keys(fields).length > 0) this.store.update(id, { ...fields, state });
    return { ...row, ...fields, state };
  }

  /** A transition that may fail to be recorded (a full disk) without stopping what it describes. */
  tryTransition(id: string, event: LifecycleEvent, fields: Partial<Omit<MachineRow, 'id'>> = {}): void {
    try {
      this.transition(id, event, fields);
    } catch (e) {
      if (e instanceof HutchError && e.code !== 'STORAGE_FULL') throw e;
      this.d.log('warn', 'state not recorded', { id, event, error: (e as Error).message });
    }
  }

  tryUpdate(id: string, fields: Partial<Omit<MachineRow, 'id'>>): void {
    try {
      this.store.update(id, fields);
    } catch (e) {
      this.d.log('warn', 'state not recorded', {
        id,
        fields: Object.keys(fields),
        error: (e as Error).message,
      });
    }
  }

  /** Work nobody awaits: its failure is logged, never an unhandled rejection. */
  background(what: string, fields: Record<string, unknown>, work: () => unknown): void {
    inBackground(this.d.log, what, fields, work);
  }

  /**
   * Makes the machine's run dir (once) and registers what goes with the machine itself: the
   * run dir (disk, sockets, saved state) and what the engine remembers about it.
   */
  own(m: Machine, kind: MachineRow['kind']): void {
    prepareRunDir(m.runDir, this.d.runAs);
    if (m.cleanup.has('run dir')) return;
    m.cleanup.push('run dir', ends.machine, () => rmSync(m.runDir, { recursive: true, force: true }));
    m.cleanup.push('disk pause', ends.machine, () => this.d.diskPauses().forget(m.id));
    const nm = this.d.net;
    if (nm) m.cleanup.push('network rows', ends.machine, () => nm.forget(m.id));
    if (kind === 'box') m.cleanup.push('exec logs', ends.machine, () => this.d.execs.forget(m.id));
    const disks = this.d.disks;
    if (disks) m.cleanup.push('disk attachments', ends.machine, () => disks.forget(m.id));
  }

  /**
   * Starts QEMU for `row` and registers it (process, cgroup, console, links) on its machine; a
   * networked machine's namespace first (removed after its QEMU: the stack runs newest first).
   */
  async launch(
    m: Machine,
    row: MachineRow,
    image: TemplateManifest,
    extra: Pick<VmSpec, 'memory' | 'incoming'> & {
      volumes?: Volume[];
      /** Every volume slot filled, empty ones with placeholders (box snapshots and their restores). */
      volumeSlots?: boolean;
      /** A restore's: the layout its state was saved with; another layout is refused before QEMU starts. */
      layout?: Layout;
    },
  ): Promise<Vm> {
    const { volumes, volumeSlots, layout, ...vmExtra } = extra;
    // Its attached disks: in a resumed or cloned guest's saved state, mounted after a cold boot.
    const machine = this.machineOf(row, volumes, volumeSlots, this.d.disks?.devicesOf(row.id));
    if (layout) checkSameLayout(layout, layoutOf(allocate(machine)));
    let netns: string | undefined;
    if (row.net) {
      const nm = this.d.net;
      if (!nm) throw new HutchError('NETWORK_UNAVAILABLE', 'guest networking is off on this server');
      // A pooled machine is no one's yet: it joins its user's network when it is handed out.
      const net = await nm.attach(row.id, row.run_dir, row.owner === '' ? undefined : row.owner);
      m.cleanup.push('network', ends.vm, () => nm.detach(net));
      netns = net.netns;
    }
    // Its own RAM file, shared, so a branch or suspend copies the file instead of streaming all
    // of RAM: a cold boot starts from an empty one, a restore from the copy restoreInto made (or
    // an empty one, filled by the migration stream). A snapshot being taken names its own.
    const ram = this.d.hv.ram.fileOf(row.id);
    if (!extra.memory && (!extra.incoming || !existsSync(ram)))
      this.d.hv.ram.create(ram, row.memory_mb * 2 ** 20, this.d.runAs);
    const spec: VmSpec = {
      id: row.id,
      accel: row.accel as Accel,
      machine,
      kernel: image.kernel,
      cmdline: this.kernelCmdline(image),
      runDir: row.run_dir,
      ...(this.d.runAs ? { runAs: this.d.runAs.user } : {}),
      memory: { kind: 'file', path: ram, share: true },
      ...(netns ? { netns } : {}),
      ...vmExtra,
    };
    let pid: number;
    try {
      pid = this.d.hv.launch(spec);
    } catch (e) {
      if (!extra.memory) this.d.hv.ram.remove(ram);
      throw e;
    }
    const vm = this.adopt(m, pid);
    vm.jail = this.confine(row, pid);
    this.store.update(row.id, { pid, jail: JSON.stringify(vm.jail) });
    return vm;
  }

  /** The machine a row describes: its size, the standard devices on its own backends, its volumes. */
  machineOf(
    row: Pick<MachineRow, 'vcpus' | 'memory_mb' | 'run_dir'> & { net?: number; display?: string | null },
    volumes?: Volume[],
    volumeSlots = false,
    disks?: DiskDevice[],
  ): MachineSpec {
    const p = runPaths(row.run_dir);
    const screen = parseScreen(row.display);
    return standardMachine({
      vcpus: row.vcpus,
      memoryMb: row.memory_mb,
      disk: join(row.run_dir, 'disk.qcow2'),
      agentSocket: p.agent,
      consoleSocket: p.console,
      ...(volumes ? { volumes } : {}),
      ...(row.net ? { nic: { tap: inside.tap, mac: inside.guestMac } } : {}),
      ...(screen ? { display: { ...screen, vncSocket: p.vnc } } : {}),
      ...(disks?.length ? { disks } : {}),
      ...(volumeSlots
        ? { emptyVolume: prepareEmptyVolume(join(this.d.config.stateDir, 'empty-volume')) }
        : {}),
    });
  }

  /** Registers a QEMU that runs already (launched now, or found after a restart) on its machine. */
  adopt(m: Machine, pid: number): Vm {
    // A networked machine found after a restart: its namespace goes after its QEMU.
    const nm = this.d.net;
    if (nm && !m.cleanup.has('network')) {
      const net = nm.adopt(m.id, m.runDir);
      if (net) m.cleanup.push('network', ends.vm, () => nm.detach(net));
    }
    m.cleanup.push('cgroup', ends.vm, async () => {
      if (!(await this.d.hv.releaseCgroup(m.id))) this.d.log('warn', 'cgroup not removed yet', { id: m.id });
    });
    // After its QEMU is gone and before its cgroup: the file's pages are charged there.
    m.cleanup.push('ram file', ends.vm, () => this.d.hv.ram.remove(this.d.hv.ram.fileOf(m.id)));
    m.cleanup.push('qemu', ends.vm, async () => {
      if (this.d.hv.isVmOf(pid, m.id)) await this.d.hv.stop(pid, runPaths(m.runDir).qmp);
    });
    const console = this.d.hv.console(runPaths(m.runDir).console, join(m.runDir, 'console.log'));
    console.start();
    const vm: Vm = { pid, console };
    m.vm = vm;
    m.cleanup.push('console', ends.handle, () => console.stop());
    // The links are replaced while the VM runs (reconnects, a resume): close whatever is current.
    m.cleanup.push('links', ends.handle, () => {
      vm.agent?.close();
      vm.qmp?.close();
      if (m.vm === vm) m.vm = undefined;
    });
    return vm;
  }

  private confine(row: MachineRow, pid: number): MachineView['jail'] {
    const jail = { seccomp: true, user: this.d.runAs?.user ?? null, cgroup: null as string | null };
    if (this.d.hv.cgroups === 'none') return jail;
    try {
      // Guest RAM plus room for QEMU itself and the TCG translation cache.
      jail.cgroup = this.d.hv.confine(row.id, pid, machineLimits(row.memory_mb, row.vcpus));
    } catch (e) {
      this.d.log('warn', 'cgroup confinement failed', { id: row.id, error: (e as Error).message });
    }
    return jail;
  }

  /**
   * Starts QEMU waiting for a migration stream, loads `stateFile`, continues the vCPUs and
   * connects to the agent, which forgets any stream the saved machine had open.
   */
  async restoreInto(
    m: Machine,
    row: MachineRow,
    image: TemplateManifest,
    stateFile: string,
    opts: {
      memoryFrom?: string;
      ignoreShared: boolean;
      fromSnapshot?: boolean;
      layout?: Layout;
      volumes?: Volume[];
      volumeSlots?: boolean;
    },
  ): Promise<{ vm: Vm; restoredUs: number; agentUs: number }> {
    // Mapped copy-on-write (HUTCH_CLONE_MEMORY=map): the snapshot's file never changes, so clones
    // share its pages; the machine has no RAM file of its own and saves stream its RAM.
    // The devices a restore launches with: the saved layout (checked) and the box's volumes.
    const devices = {
      ...(opts.layout ? { layout: opts.layout } : {}),
      ...(opts.volumes ? { volumes: opts.volumes } : {}),
      ...(opts.volumeSlots ? { volumeSlots: true } : {}),
    };
    if (opts.memoryFrom && opts.fromSnapshot && this.d.config.cloneMemory === 'map') {
      const memory = { kind: 'file', path: opts.memoryFrom, share: false } as const;
      return this.restoreLaunched(
        m,
        row,
        stateFile,
        await this.launch(m, row, image, { memory, incoming: true, ...devices }),
        opts,
      );
    }
    if (opts.memoryFrom) {
      const to = this.d.hv.ram.fileOf(row.id);
      // Registered before the copy: a copy cut short is removed with the rest.
      m.cleanup.push('ram copy', ends.vm, () => this.d.hv.ram.remove(to));
      await this.d.hv.ram.copy(opts.memoryFrom, to, { owner: this.d.runAs, chargeTo: this.chargeTo(row) });
    }
    return this.restoreLaunched(
      m,
      row,
      stateFile,
      await this.launch(m, row, image, { incoming: true, ...devices }),
      opts,
    );
  }

  private async restoreLaunched(
    m: Machine,
    row: MachineRow,
    stateFile: string,
    vm: Vm,
    opts: { ignoreShared: boolean },
  ): Promise<{ vm: Vm; restoredUs: number; agentUs: number }> {
    const qmp = await this.qmpOf(m);
    const t0 = performance.now();
    await this.d.hv.loadState(qmp, runPaths(row.run_dir).migDir, stateFile, {
      ignoreShared: opts.ignoreShared,
    });
    await qmp.execute('cont');
    const t1 = performance.now();
    vm.agent = await this.waitForAgent(m, vm);
    await vm.agent.reset();
    return {
      vm,
      restoredUs: Math.round((t1 - t0) * 1000),
      agentUs: Math.round((performance.now() - t1) * 1000),
    };
  }

  /** The cgroup a copy of `row`'s RAM is written from (made before its QEMU), when there is one. */
  chargeTo(row: Pick<MachineRow, 'id' | 'memory_mb' | 'vcpus'>): string[] | undefined {
    try {
      return this.d.hv.chargeTo(row.id, machineLimits(row.memory_mb, row.vcpus));
    } catch (e) {
      this.d.log('warn', 'cgroup confinement failed', { id: row.id, error: (e as Error).message });
      return undefined;
    }
  }

  /** What a save copies of `m`'s RAM: its own file, unless an older daemon started it without one. */
  ramCopy(m: Machine, to: string, copy: CopyOptions = {}): MachineSave['memory'] {
    const from = this.d.hv.ram.fileOf(m.id);
    return existsSync(from) ? { from, to, copy: { owner: this.d.runAs, ...copy } } : undefined;
  }

  /** Connects to a booting VM's agent, failing fast (with the console's last words) if QEMU dies. */
  async waitForAgent(m: Machine, vm: Vm): Promise<AgentConnection> {
    try {
      return await this.d.guest.connectBooting(
        vm.pid,
        m.runDir,
        this.d.config.bootTimeoutMs,
        () => `console: ${vm.console.recent().toString('utf8').slice(-300)}`,
      );
    } catch (e) {
      const msg = (e as Error).message;
      throw new Error(msg.startsWith('qemu exited') ? msg : `${m.id}: ${msg}`);
    }
  }

  /** A fresh link to a running VM's agent (adoption, reconnects, after a pause). */
  connectAgent(m: Machine): Promise<AgentConnection> {
    return this.d.guest.connect(runPaths(m.runDir).agent, 10_000);
  }

  /** The machine's QMP connection, opened on first use and kept (QEMU serves one client at a time). */
  async qmpOf(m: Machine): Promise<Qmp> {
    const vm = m.vm;
    if (!vm) throw new HutchError('MACHINE_NOT_RUNNING', `machine ${m.id} is not running`);
    if (vm.qmp?.isOpen()) return vm.qmp;
    vm.qmp = await this.d.hv.qmp(runPaths(m.runDir).qmp, 5000);
    return vm.qmp;
  }

  /**
   * Makes a booted or restored machine its own, with one CONFIGURE: its hostname, a fresh
   * machine-id and kernel RNG state (every clone of a snapshot starts with the snapshot's), the
   * clock, its root filesystem grown to its disk, and its volumes mounted.
   */
  async giveIdentity(
    agent: AgentConnection,
    id: string,
    volumes: readonly GuestVolume[] = [],
    opts: { net?: boolean } = {},
  ): Promise<void> {
    await configureGuest(agent, {
      hostname: hostnameOf(id),
      growRoot: true,
      volumes,
      ...(opts.net ? { net: guestNet } : {}),
    });
  }

  /** The kernel command line for this host: the image's, plus TCG's timing flags. */
  kernelCmdline(image: TemplateManifest): string {
    return this.d.accel.accel === 'tcg' ? `${image.cmdline} ${tcgTimingArgs(image.kernelHz)}` : image.cmdline;
  }

  /**
   * The parameters snapshots are taken with; a snapshot only fits machines booted alike. `size`:
   * the machines' (a box's); absent, a template's (its recipe's, else the server's defaults).
   */
  snapshotParams(
    image: TemplateManifest,
    size = this.templateSize(image.name),
    volumeSlots = false,
    net = false,
    screen = this.templateScreen(image.name),
  ): SnapshotParams {
    const { vcpus, memoryMb } = size;
    const display = screen ? screenText(screen) : null;
    const startup = templateRecipes[image.name]?.startup;
    return {
      qemu: this.d.config.qemuBinary,
      accel: this.d.accel.accel,
      vcpus,
      memoryMb,
      cmdline: this.kernelCmdline(image),
      // The run dir does not matter: a layout has no backends.
      layout: layoutOf(
        allocate(
          this.machineOf(
            { vcpus, memory_mb: memoryMb, run_dir: '/', net: net ? 1 : 0, display },
            [],
            volumeSlots,
          ),
        ),
      ),
      ...(volumeSlots ? { volumeSlots } : {}),
      ...(net ? { net } : {}),
      ...(display ? { display } : {}),
      // A desktop's snapshot is taken with its desktop started (and nothing else warmed).
      ...(startup ? { warm: [startup] } : {}),
      runAs: this.d.runAs,
    };
  }

  /** Whether a template's machines have a network by default: desktops do, when the server has one. */
  templateNet(template: string): boolean {
    return templateRecipes[template]?.display === true && this.d.net !== undefined;
  }

  /** The screen a template's machines have by default: none, or the default size. */
  templateScreen(template: string): ScreenSize | undefined {
    return templateRecipes[template]?.display ? defaultScreen : undefined;
  }

  /**
   * What a template runs after a cold boot (the desktop's start), so a machine booted cold is
   * the machine its snapshot would have given. Fails the boot with the command's own words.
   */
  async runStartup(agent: AgentConnection, template: string): Promise<void> {
    const argv = templateRecipes[template]?.startup;
    if (!argv) return;
    const r = await agent.execCollect({ argv, timeoutMs: startupTimeoutMs }, { maxOutputBytes: 65536 });
    if (r.exitCode !== 0)
      throw new Error(
        `${argv.join(' ')} failed (exit ${r.exitCode}): ${r.stderr.toString().trim().slice(-2000)}`,
      );
  }

  /** The size of a template's machines: its recipe's when it declares one, else the server's defaults. */
  templateSize(template: string): { vcpus: number; memoryMb: number } {
    return templateSize(template, {
      vcpus: this.d.config.machineVcpus,
      memoryMb: this.d.config.machineMemoryMb,
    });
  }

  /** A boot that finished: the machine is running, watched, and its TTL armed. */
  markRunning(m: Machine, bootMs: number): MachineRow {
    const agent = m.vm?.agent;
    if (!agent) throw new Error(`machine ${m.id} has no agent connection`);
    const row = this.transition(m.id, 'booted', {
      boot_ms: bootMs,
      started_at: new Date().toISOString(),
      stopped_at: null,
      error: null,
    });
    this.watchAgent(m, agent);
    this.armTtl(row);
    m.touch();
    this.d.log('info', `${row.kind} started`, { id: m.id, mode: row.mode, boot_ms: bootMs });
    return row;
  }

  /** A create that failed: everything it made is removed; the error keeps the console's last words. */
  async bootFailed(m: Machine, what: 'machine' | 'box', e: unknown): Promise<never> {
    const tail = m.vm?.console.recent().toString('utf8').slice(-1500) ?? '';
    await this.end(m, 'deleted');
    if (e instanceof HutchError) throw e;
    throw orStorageFull(e, 'BOOT_FAILED', `${what} did not boot: ${(e as Error).message}`, {
      console_tail: tail,
    });
  }

  armTtl(row: MachineRow): void {
    const m = this.machine(row);
    if (m.ttl) clearTimeout(m.ttl);
    m.ttl = undefined;
    if (!row.expires_at) return;
    const ms = Math.max(0, new Date(row.expires_at).getTime() - Date.now());
    m.ttl = setTimeout(() => this.background('ttl expiry', { id: row.id }, () => this.expire(row.id)), ms);
    m.ttl.unref();
  }

  async expire(id: string): Promise<void> {
    const m = this.d.registry.get(id);
    if (!m) return;
    await m.lock.run(async () => {
      const row = this.store.get(id);
      if (!row?.expires_at || new Date(row.expires_at).getTime() > Date.now() + 5) return;
      this.d.log('info', 'machine expired', { id });
      await this.end(m, 'deleted');
    });
  }

  /** Fails or removes a machine from outside its flows (a watcher, the sweeper): under its lock. */
  endLocked(id: string, outcome: 'deleted' | 'failed', reason?: string): Promise<void> {
    const m = this.d.registry.get(id);
    if (!m) return Promise.resolve();
    return m.lock.run(() => this.end(m, outcome, reason));
  }

  /**
   * Ends a machine: its cleanup stack runs once, newest first (links, console, QEMU, cgroup, run
   * dir, …). `deleted` removes the row; `failed` keeps it, marked with the reason, so its owner
   * can read what happened until they delete it or its TTL passes, except for a box, whose disk
   * is its user's data: a box that failed is stopped, disk kept. Callers hold the machine's lock.
   */
  end(m: Machine, outcome: 'deleted' | 'failed', reason?: string): Promise<void> {
    if (m.ending) return m.ending;
    m.ending = this.ending(m, outcome, reason).finally(() => {
      m.ending = undefined;
    });
    return m.ending;
  }

  private async ending(m: Machine, outcome: 'deleted' | 'failed', reason?: string): Promise<void> {
    const row = this.store.get(m.id);
    if (!row) {
      // Never inserted (a pooled machine) or already gone: only its resources are left.
      this.report(m, await m.cleanup.run('destroy'));
      this.clearTtl(m);
      return;
    }
    // Marked first so a daemon that dies mid-way finishes the job at its next start; on a full
    // disk the mark fails, and the end goes on anyway: it frees the space it needs.
    if (outcome === 'deleted') this.tryTransition(m.id, 'destroy');
    this.clearTtl(m);
    // Its disks written back and unmounted while the guest still runs (what it fsync'd is safe
    // anyway; this also leaves their journals clean).
    if (outcome === 'deleted') await this.d.disks?.unmountAll(m.vm?.agent, m.id);
    if (row.kind === 'box' && outcome === 'failed') {
      this.report(m, await m.cleanup.run('halt'));
      this.transition(m.id, 'fail', {
        error: reason ?? 'failed',
        pid: null,
        stopped_at: new Date().toISOString(),
      });
      this.d.log('warn', 'box stopped by a failure', { id: m.id, reason });
      return;
    }
    this.report(m, await m.cleanup.run('destroy'));
    if (outcome === 'deleted') {
      this.store.delete(m.id);
      this.d.registry.delete(m.id);
      return;
    }
    const failed = this.transition(m.id, 'fail', { error: reason ?? 'failed', pid: null });
    this.armTtl(failed);
    this.d.log('warn', 'machine failed', { id: m.id, reason });
  }

  /** Ends the VM but keeps the machine (its run dir, disk and row): suspend, a box stopping. */
  async halt(m: Machine): Promise<void> {
    this.report(m, await m.cleanup.run('halt'));
  }

  private report(m: Machine, failures: { what: string; error: Error }[]): void {
    for (const f of failures)
      this.d.log('warn', 'cleanup step failed', { id: m.id, step: f.what, error: f.error.message });
  }

  clearTtl(m: Machine): void {
    if (m.ttl) clearTimeout(m.ttl);
    m.ttl = undefined;
  }

  /**
   * The agent of a running machine or box. Running without one means its link is broken and
   * being retried: AGENT_UNAVAILABLE with the cause, not "not running".
   */
  agentOf(row: MachineRow): AgentConnection {
    const agent = this.d.registry.get(row.id)?.vm?.agent;
    const what = `${row.kind} ${row.id}`;
    // Its vCPUs are stopped until the host has space: a request would only hang.
    const paused = this.d.diskPauses().cause(row.id);
    if (paused) throw new HutchError('STORAGE_FULL', `${what} is ${paused}`);
    if (row.state === 'running' && agent) return agent;
    if (row.state === 'running')
      throw new HutchError(
        'AGENT_UNAVAILABLE',
        `${what}'s agent is not answering: ${row.error ?? 'reconnecting'}`,
      );
    if (row.kind === 'box')
      throw new HutchError('BOX_NOT_RUNNING', `${what} is ${row.state}: start it first`);
    throw new HutchError(
      'MACHINE_NOT_RUNNING',
      `${what} is ${row.state}${row.error ? `: ${row.error}` : ''}`,
    );
  }

  /**
   * Watches a running machine's agent link. When QEMU died with it, the machine failed. When the
   * guest broke the protocol (or the link dropped), the machine keeps running with the cause in
   * its `error` ("agent broken: …") and the link is retried with exponential backoff, so a guest
   * that keeps corrupting its port costs the host a few reconnects a minute, not a busy loop.
   * A link that stays up for agentHealthyMs clears the error and the backoff.
   */
  watchAgent(m: Machine, agent: AgentConnection): void {
    // Every link of a running machine serves its guest's API: the tunnel lives and dies with
    // the link, and a new link (reconnect, resume, adoption) comes through here again. The owner
    // is read per connection: a pooled machine gets its owner only when it is handed out.
    const serve = this.d.onGuestApiStream;
    if (serve)
      agent.serveGuestApi((stream) => {
        const row = this.store.get(m.id);
        if (row?.state === 'running' && row.owner !== '') serve(m.id, row.owner, stream);
        else stream.destroy();
      });
    const healthy = setTimeout(() => {
      if (!agent.isOpen || m.vm?.agent !== agent) return;
      const hadFailures = m.agentFailures > 0;
      m.agentFailures = 0;
      if (hadFailures && this.store.get(m.id)?.error?.startsWith('agent broken'))
        this.tryUpdate(m.id, { error: null });
    }, agentHealthyMs);
    healthy.unref();
    this.background('agent watch', { id: m.id }, async () => {
      const err = await agent.closed;
      clearTimeout(healthy);
      const vm = m.vm;
      if (this.store.get(m.id)?.state !== 'running' || !vm || vm.agent !== agent) return;
      // The agent connection drops when QEMU dies; tell the two apart.
      await new Promise((r) => setTimeout(r, 50));
      if (!this.d.hv.isAlive(vm.pid)) {
        await this.endLocked(m.id, 'failed', `qemu exited unexpectedly${err ? ` (${err.message})` : ''}`);
        return;
      }
      vm.agent = undefined;
      await this.reconnectAgent(m, vm, err?.message ?? 'the link closed');
    });
  }

  private async reconnectAgent(m: Machine, vm: Vm, cause: string): Promise<void> {
    for (;;) {
      m.agentFailures++;
      const failures = m.agentFailures;
      const delay = Math.min(agentBackoffMaxMs, agentBackoffMs * 2 ** (failures - 1));
      this.tryUpdate(m.id, { error: `agent broken: ${cause}`.slice(0, 500) });
      this.d.log('warn', 'agent link broken; reconnecting', { id: m.id, cause, failures, delay_ms: delay });
      await new Promise((r) => setTimeout(r, delay));
      const row = this.store.get(m.id);
      if (row?.state !== 'running' || m.vm !== vm || this.d.closing()) return;
      if (!this.d.hv.isAlive(vm.pid)) {
        await this.endLocked(m.id, 'failed', `qemu exited unexpectedly (agent: ${cause})`);
        return;
      }
      try {
        vm.agent = await this.connectAgent(m);
        this.watchAgent(m, vm.agent);
        return;
      } catch (e) {
        cause = (e as Error).message;
        if (failures >= agentMaxFailures) {
          await this.endLocked(m.id, 'failed', `agent broken: gave up after ${failures} tries: ${cause}`);
          return;
        }
      }
    }
  }
}

/** Box ids have an underscore, which a hostname may not (CONFIGURE checks [A-Za-z0-9.-]). */
export function hostnameOf(id: string): string {
  return id.replace(/_/g, '-');
}
