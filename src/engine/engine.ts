import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { AgentActions } from '../agents/agent-actions.js';
import type { Log } from '../background.js';
import type { Config } from '../config.js';
import type { ActionTargets } from '../core/dispatch.js';
import { actionsFor } from '../core/dispatch.js';
import type { Principal } from '../core/principal.js';
import { DesktopActions, type HeldMachine } from '../desktop/desktop-actions.js';
import { HutchError } from '../errors.js';
import { GatewayActions } from '../gateway/gateway-actions.js';
import type { AgentConnection } from '../guest/agent-connection.js';
import { GuestOps } from '../guest/guest-ops.js';
import { checkPort, guestListeningPorts, openGuestPort } from '../guest/port-forward.js';
import type { TemplateManifest } from '../images/builder.js';
import { templateRecipes } from '../images/recipes.js';
import { SnapshotCache } from '../images/snapshots.js';
import { type EgressInput, parseEgress } from '../net/egress.js';
import type { Denial, NetworkManager } from '../net/network-manager.js';
import { Disks } from '../storage/disks/disk-service.js';
import { DiskStore } from '../storage/disks/disk-store.js';
import type { VolumeService } from '../storage/volumes/volume-service.js';
import type { AccelChoice } from '../vmm/accel.js';
import type { ConsoleTap } from '../vmm/console.js';
import { agentLink, type GuestLink, type Hypervisor, qemuHypervisor } from '../vmm/hypervisor.js';
import { memoryDirOf } from '../vmm/memory-file.js';
import { traversableByQemu } from '../vmm/run-dir.js';
import { Admission } from './admission.js';
import { type BoxExecRequest, BoxExecs, execEnv } from './box-execs.js';
import { type BoxView, boxSpecOf, type ExecView, toBoxView } from './box-view.js';
import { DiskActions } from './disk-actions.js';
import { DiskPauses } from './disk-pauses.js';
import type { DiskRoom } from './disk-room.js';
import type { ExecEvent } from './exec-log.js';
import { type BoxTimers, setBoxTimers } from './flows/box-timers.js';
import { branchMachine } from './flows/branch.js';
import type { FlowContext } from './flows/context.js';
import {
  boxLimits,
  type CreateBox,
  type CreateBoxRequest,
  type CreateMachine,
  createBox,
  createMachine,
} from './flows/create.js';
import { type RunResult, runOnce } from './flows/run-once.js';
import { takeSnapshot } from './flows/snapshot.js';
import { rebootBox, startBox, stopBox } from './flows/stop-start.js';
import { pauseMachine, resumeMachine, suspendMachine } from './flows/suspend.js';
import {
  type CreateTemplate,
  createTemplate,
  deleteTemplate,
  failInterruptedBuilds,
  findTemplate,
  type TemplateView,
  toTemplateView,
} from './flows/templates.js';
import type { ImageResolver } from './images.js';
import { type Machine, Registry } from './machine.js';
import { type MachineView, toView } from './machine-view.js';
import { NetRouting } from './net-routing.js';
import { HeldText, OutputBudget } from './output-budget.js';
import { WarmPool } from './pool.js';
import { recover } from './recovery.js';
import { type GuestApiStreamHandler, type RunAs, Runtime } from './runtime.js';
import { activeStates, type MachineRow, Store } from './store.js';
import { sweepMachines } from './sweeper.js';
import { VolumeActions } from './volume-actions.js';

export type { BoxTimers } from './flows/box-timers.js';
export { clampTtl, ttlBounds } from './flows/context.js';
export type { CreateBox, CreateBoxRequest, CreateMachine } from './flows/create.js';
export type { CreateTemplate, TemplateView } from './flows/templates.js';
export type { BootImage, ImageResolver } from './images.js';

export interface ExecRequest {
  argv: string[];
  env?: Record<string, string>;
  cwd?: string;
  stdin?: string;
  timeoutMs?: number;
  /** Aborted: the command is killed (a stopped agent's, or one whose REST client went away). */
  signal?: AbortSignal;
}

export interface ExecResult {
  exit_code: number | null;
  signal: number | null;
  timed_out: boolean;
  stdout: HeldText;
  stderr: HeldText;
  truncated: boolean;
  duration_ms: number;
}

export interface Health {
  status: 'ok';
  running: number;
  machines: number;
  accel: string;
  accel_reason: string;
  templates: Record<string, 'ready' | 'not built'>;
  snapshots: Record<string, string>;
  pool: Record<string, { ready: number; target: number }>;
  guest_memory_mb: { used: number; cap: number };
  max_machines: number;
  uptime_s: number;
  disk: DiskRoom;
}

export type { RunResult } from './flows/run-once.js';

/** What the engine is built from; everything but the config has a real default. */
export interface EngineParts {
  hypervisor?: Hypervisor;
  guest?: GuestLink;
  images?: ImageResolver;
  snapshots?: SnapshotCache;
  /** Run QEMU as this user (default: config.qemuUser, when it exists). */
  runAs?: RunAs | null;
  /** Serves the API connections processes inside machines open (their `hutch`); absent: refused. */
  onGuestApiStream?: GuestApiStreamHandler;
  /** Guest networks, set up by the daemon (src/net/); absent: no machine gets a network. */
  net?: NetworkManager;
  /** Persistent volumes (src/storage/volumes/); absent: the volume actions answer NOT_SERVED. */
  volumes?: VolumeService;
  /** The model gateway (src/gateway/); absent: one from the config. The engine closes it. */
  gateway?: GatewayActions;
}

/** A networked machine's egress: its rules, what was refused (per reason), the latest refusals. */
export interface EgressView {
  id: string;
  net: boolean;
  rules: { allow: string[]; deny: string[] };
  denied: Record<string, number>;
  recent: Denial[];
}

/**
 * The engine's public face: every operation for a principal. It finds the object for that
 * principal (another owner's object does not exist for them), takes the object's lock, and
 * runs the flow (engine/flows/). Adapters reach it only through core/dispatch.ts.
 */
export class Engine {
  private readonly store: Store;
  private readonly registry = new Registry();
  private readonly startedAt = Date.now();
  private sweeper: NodeJS.Timeout | undefined;
  private closing = false;
  readonly snapshots: SnapshotCache;
  private readonly execs: BoxExecs;
  private readonly diskPauses: DiskPauses;
  /** Output held by buffered execs (exec, runOnce) until their replies are written. */
  private readonly execOutput: OutputBudget;
  private readonly rt: Runtime;
  private readonly cx: FlowContext;
  private readonly hv: Hypervisor;
  private readonly routing: NetRouting;
  private readonly disks: Disks;
  private readonly diskActions: DiskActions;
  private readonly vols: VolumeActions;
  private readonly desktop: DesktopActions;
  private readonly gateway: GatewayActions;
  private readonly agents: AgentActions;

  constructor(
    private readonly config: Config,
    private readonly templates: Map<string, TemplateManifest>,
    private readonly accel: AccelChoice,
    private readonly log: Log,
    parts: EngineParts | ImageResolver = {},
  ) {
    const p: EngineParts = 'resolve' in parts ? { images: parts } : parts;
    mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
    const runRoot = join(config.stateDir, 'run');
    mkdirSync(runRoot, { recursive: true, mode: 0o700 });
    this.store = new Store(join(config.stateDir, 'hutch.db'));
    const runAs = p.runAs === null ? undefined : (p.runAs ?? lookupUser(config.qemuUser));
    // QEMU, once it has dropped to its user, must reach its run dir to make migration sockets,
    // and its kernel and disks in the image cache; other local users reach none of it.
    for (const d of [config.stateDir, runRoot]) traversableByQemu(d, runAs);
    mkdirSync(config.imageDir, { recursive: true });
    traversableByQemu(config.imageDir, runAs);
    this.hv = p.hypervisor ?? qemuHypervisor(config.qemuBinary, memoryDirOf(config.stateDir), runAs);
    this.execs = new BoxExecs(
      this.store,
      {
        perExec: config.execLogMaxBytes,
        perBox: config.execLogsBoxMaxBytes,
        total: config.execLogsTotalMaxBytes,
      },
      (msg, fields) => this.log('warn', msg, fields),
    );
    this.execOutput = new OutputBudget(config.execBufferBytes);
    this.disks = new Disks(new DiskStore(join(config.stateDir, 'disks.db')), config.stateDir, runAs);
    this.rt = new Runtime({
      config,
      store: this.store,
      hv: this.hv,
      guest: p.guest ?? agentLink,
      log,
      accel,
      registry: this.registry,
      runRoot,
      runAs,
      execs: this.execs,
      diskPauses: () => this.diskPauses,
      closing: () => this.closing,
      onGuestApiStream: p.onGuestApiStream,
      net: p.net,
      disks: this.disks,
    });
    this.snapshots =
      p.snapshots ??
      new SnapshotCache(config.imageDir, (image, params, dir) => takeSnapshot(this.rt, image, params, dir));
    this.diskPauses = new DiskPauses({
      stateDir: config.stateDir,
      running: () =>
        this.store
          .list()
          .filter((r) => r.state === 'running' && this.registry.get(r.id)?.vm)
          .map((r) => r.id),
      qmp: (id) => this.rt.qmpOf(this.machineOf(id)),
      setError: (id, error) => this.rt.tryUpdate(id, { error }),
      log: (level, msg, fields) => this.log(level, msg, fields),
    });
    const admission = new Admission(config, this.store, templates);
    this.cx = {
      rt: this.rt,
      config,
      admission,
      snapshots: this.snapshots,
      templates,
      images: p.images,
      pool: undefined as unknown as WarmPool,
    };
    this.cx.pool = new WarmPool(this.rt, config, templates, this.snapshots, admission, this.registry);
    this.routing = new NetRouting(this.rt, config, this.store, (p, ref) => this.findAny(p, ref));
    admission.setOthers(this.cx.pool);
    admission.setDiskClaims(() => this.disks.claims());
    this.diskActions = new DiskActions(this.cx, config, this.disks, this.findAny.bind(this));
    this.desktop = new DesktopActions({ hold: (q, id) => this.hold(q, id), qmpOf: (m) => this.rt.qmpOf(m) });
    this.gateway = p.gateway ?? new GatewayActions(config, log);
    this.vols = new VolumeActions(p.volumes, {
      openSession: (q, id) => this.openSession(q, id),
      destroy: (q, id) => this.destroy(q, id),
      get: (q, id) => this.get(q, id),
      diskPaused: (id) => this.diskPauses.cause(id),
    });
    // Agents act as their principal, through the same actions as any other caller.
    this.agents = new AgentActions(config, (q) => actionsFor(this, q, log), log);
  }

  /** Re-adopts machines left by a previous daemon, cleans what is dead, starts the sweeper. */
  async start(): Promise<void> {
    // Exec streams live on the agent connection of the daemon that started them: a restart
    // ends them (the agent kills their processes when that connection goes).
    this.execs.endOrphans('the daemon restarted while the command ran');
    failInterruptedBuilds(this.store);
    await recover(this.rt);
    // Attachments of machines that are gone (a crash between a removal and its cleanup).
    this.disks.store.forgetAllBut(new Set(this.store.list().map((r) => r.id)));
    // Namespaces, links and slots of machines that did not survive (a crash, a kill -9).
    const net = this.rt.d.net;
    if (net) {
      // Rows of machines that are gone (a crash between a machine's end and its rows' removal).
      net.forgetAllBut((id) => this.store.get(id) !== undefined);
      const t0 = performance.now();
      const removed = await net.sweep((id) => this.registry.get(id)?.vm !== undefined);
      if (removed.length)
        this.log('info', 'network leftovers removed', {
          count: removed.length,
          ms: Math.round(performance.now() - t0),
        });
    }
    this.sweeper = setInterval(() => this.rt.background('sweep', {}, () => this.sweep()), 500);
    this.sweeper.unref();
  }

  /**
   * Takes each template's snapshot in the background (once: it is cached with the template).
   * Until it is ready, creates boot cold.
   */
  prepareSnapshots(): void {
    for (const manifest of this.templates.values()) {
      this.snapshots.ensure(manifest, this.rt.snapshotParams(manifest)).then(
        (s) => {
          this.log('info', 'template snapshot ready', { template: s.template, state_bytes: s.stateBytes });
          this.cx.pool.refill();
          // Then the networked machines' one (a NIC is part of the layout), after: one QEMU at a time.
          if (this.rt.d.net)
            this.snapshots.ensure(manifest, this.rt.snapshotParams(manifest, undefined, false, true)).then(
              (n) => {
                this.log('info', 'networked template snapshot ready', { template: n.template });
                // A desktop's pool is networked: it fills once this snapshot exists.
                this.cx.pool.refill();
              },
              (e: unknown) =>
                this.log('warn', 'networked template snapshot failed; networked machines boot cold', {
                  template: manifest.name,
                  error: (e as Error).message,
                }),
            );
        },
        (e: unknown) =>
          this.log('error', 'template snapshot failed', {
            template: manifest.name,
            error: (e as Error).message,
          }),
      );
    }
  }

  schedulePoolRefill(): void {
    this.cx.pool.refill();
  }

  health(): Health {
    const rows = this.store.list();
    const active = rows.filter((r) => activeStates.includes(r.state));
    const templates: Record<string, 'ready' | 'not built'> = {};
    const snapshots: Health['snapshots'] = {};
    for (const name of Object.keys(templateRecipes)) {
      templates[name] = this.templates.has(name) ? 'ready' : 'not built';
      const manifest = this.templates.get(name);
      snapshots[name] = manifest ? this.snapshots.status(manifest, this.rt.snapshotParams(manifest)) : 'none';
    }
    return {
      status: 'ok',
      running: rows.filter((r) => r.state === 'running').length,
      machines: rows.length,
      accel: this.accel.accel,
      accel_reason: this.accel.reason,
      templates,
      snapshots,
      pool: this.cx.pool.status(),
      guest_memory_mb: {
        used: active.reduce((s, r) => s + r.memory_mb, 0),
        cap: this.config.maxGuestMemoryMb,
      },
      max_machines: this.config.maxMachines,
      uptime_s: Math.round((Date.now() - this.startedAt) / 1000),
      disk: this.diskRoom(),
    };
  }

  diskRoom(): DiskRoom {
    return this.cx.admission.diskRoom();
  }

  poolStatus(): Record<string, { ready: number; target: number }> {
    return this.cx.pool.status();
  }

  // ---- finding objects for a caller --------------------------------------------------------

  private machineOf(id: string): Machine {
    const row = this.store.get(id);
    if (!row) throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(id)}`);
    return this.rt.machine(row);
  }

  /** A row with the cause the engine knows of now, even when the store could not record it. */
  private withCause(row: MachineRow): MachineRow {
    const cause = this.diskPauses.cause(row.id);
    return cause ? { ...row, error: cause } : row;
  }

  /** The caller's machine or box: another owner's object is "not found", never "forbidden". */
  private find(p: Principal, idOrName: string, kind: MachineRow['kind'] = 'machine'): MachineRow {
    const row = this.store.get(idOrName) ?? this.store.findByName(p.user, idOrName);
    if (!row || row.owner !== p.user || row.kind !== kind)
      throw kind === 'box'
        ? new HutchError('BOX_NOT_FOUND', `no box ${JSON.stringify(idOrName)}`)
        : new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(idOrName)}`);
    return this.withCause(row);
  }

  /** The caller's machine or box, whichever has this id or name (actions that serve both); of `kind` when given. */
  private findAny(p: Principal, idOrName: string, kind?: MachineRow['kind']): MachineRow {
    if (kind) return this.find(p, idOrName, kind);
    const row = this.store.get(idOrName) ?? this.store.findByName(p.user, idOrName);
    if (!row || row.owner !== p.user)
      throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(idOrName)}`);
    return this.withCause(row);
  }

  /** Runs `fn` under the lock of the caller's machine, with its row as it is once the lock is held. */
  private locked<T>(
    p: Principal,
    idOrName: string,
    kind: MachineRow['kind'],
    fn: (m: Machine, row: MachineRow) => Promise<T>,
  ): Promise<T> {
    const first = this.find(p, idOrName, kind);
    const m = this.rt.machine(first);
    return m.lock.run(() => fn(m, this.find(p, first.id, kind)));
  }

  /** The caller's machine, running or paused (a suspended one is woken), in use until released. */
  private hold(p: Principal, idOrName: string): Promise<HeldMachine> {
    return this.locked(p, idOrName, 'machine', async (m, row) => {
      let now = row;
      if (now.state === 'suspended') {
        await resumeMachine(this.cx, m);
        now = this.find(p, row.id, 'machine');
      }
      if ((now.state !== 'running' && now.state !== 'paused') || !m.vm)
        throw new HutchError('MACHINE_NOT_RUNNING', `machine ${now.id} is ${now.state}`);
      m.sessions++;
      m.touch();
      let released = false;
      return {
        m,
        row: now,
        release: () => {
          if (released) return;
          released = true;
          m.sessions--;
          m.touch();
        },
      };
    });
  }

  private view(row: MachineRow): MachineView {
    return {
      ...toView(this.withCause(row), this.config.autoSuspendSeconds),
      address: this.addressOf(row.id),
    };
  }

  private boxView(row: MachineRow): BoxView {
    return { ...toBoxView(row), address: this.addressOf(row.id) };
  }

  /** Where a running networked machine's network mates reach it (its namespace's outside address). */
  private addressOf(id: string): string | null {
    return this.rt.d.net?.netOf(id)?.outside.ns ?? null;
  }

  // ---- machines (REST /v1/machines) --------------------------------------------------------

  /** Who the caller is, as the engine will treat it (GET /v1/whoami; the guest CLI's identity). */
  whoami(p: Principal): { user_id: string; via: Principal['via']; machine?: string } {
    return { user_id: p.user, via: p.via, ...(p.machine ? { machine: p.machine } : {}) };
  }

  list(p: Principal): MachineView[] {
    return this.store
      .list(p.user)
      .filter((r) => r.kind === 'machine')
      .map((r) => this.view(r));
  }

  get(p: Principal, idOrName: string): MachineView {
    return this.view(this.find(p, idOrName));
  }

  /** With `volume`, the volume is restored into /root before this answers (volume-actions.ts). */
  async create(p: Principal, req: CreateMachine & { volume?: string }): Promise<MachineView> {
    const make = async (): Promise<MachineView> => this.view(await createMachine(this.cx, p, req));
    return req.volume ? this.vols.createWithVolume(p, req.volume, make) : make();
  }

  async destroy(p: Principal, idOrName: string): Promise<void> {
    await this.locked(p, idOrName, 'machine', (m) => this.rt.end(m, 'deleted'));
  }

  async branch(
    p: Principal,
    idOrName: string,
    req: { name?: string; ttlSeconds?: number },
  ): Promise<MachineView & { pause_ms: number }> {
    const r = await branchMachine(this.cx, p, this.find(p, idOrName), req);
    return { ...this.view(r), pause_ms: r.pause_ms };
  }

  async pause(p: Principal, idOrName: string): Promise<MachineView & { pause_us: number }> {
    const r = await this.locked(p, idOrName, 'machine', (m) => pauseMachine(this.cx, m));
    return { ...this.view(r.row), pause_us: r.us };
  }

  async resume(p: Principal, idOrName: string): Promise<MachineView & { resume_us: number }> {
    const r = await this.locked(p, idOrName, 'machine', (m) => resumeMachine(this.cx, m));
    return { ...this.view(r.row), resume_us: r.us };
  }

  async suspend(p: Principal, idOrName: string): Promise<MachineView & { suspend_us: number }> {
    const r = await this.locked(p, idOrName, 'machine', (m) => suspendMachine(this.cx, m));
    return { ...this.view(r.row), suspend_us: r.us };
  }

  /** A networked machine's or box's egress rules and refusals (GET /v1/machines/{id}/egress). */
  async egress(p: Principal, idOrName: string, kind: MachineRow['kind'] = 'machine'): Promise<EgressView> {
    const row = this.find(p, idOrName, kind);
    const net = this.rt.d.net;
    if (!row.net || !net)
      return { id: row.id, net: false, rules: { allow: [], deny: [] }, denied: {}, recent: [] };
    return { id: row.id, net: true, ...(await net.egressOf(row.id)) };
  }

  /**
   * Replaces a networked machine's egress rules; a running one's firewall changes in one
   * transaction, for open connections too. Bad rules change nothing (INVALID_ARGUMENT).
   */
  async setEgress(
    p: Principal,
    idOrName: string,
    input: EgressInput,
    kind: MachineRow['kind'] = 'machine',
  ): Promise<EgressView> {
    const rules = parseEgress(input);
    const row = this.find(p, idOrName, kind);
    const net = this.rt.d.net;
    if (!row.net || !net)
      throw new HutchError(
        'NOT_SUPPORTED',
        `${row.id} has no network: egress rules apply to machines made with "net": true`,
      );
    await this.locked(p, row.id, kind, () => net.setRules(row.id, rules));
    return this.egress(p, row.id, kind);
  }

  /** The objects the action table dispatches to (core/dispatch.ts `on`). */
  actionTargets(): ActionTargets {
    return {
      engine: this,
      disks: this.diskActions,
      volumes: this.vols,
      desktop: this.desktop,
      gateway: this.gateway,
      agents: this.agents,
      net: this.routing,
    };
  }

  // ---- networks, proxies, domains (engine/net-routing.ts) -----------------------------------

  /** Whether this server gives machines a network (HUTCH_NET=on and its setup worked). */
  networking(): boolean {
    return this.rt.d.net !== undefined;
  }

  /** Sets the machine's idle auto-suspend timeout (0 disables it; null: the server default). */
  setAutoSuspend(p: Principal, idOrName: string, seconds: number | null): MachineView {
    const row = this.find(p, idOrName);
    this.store.update(row.id, { auto_suspend_seconds: seconds });
    this.rt.machine(row).touch();
    return this.view(this.find(p, row.id));
  }

  /**
   * The agent of the caller's running machine or box for one piece of work, checked under its
   * lock (so it never lands in the middle of a pause, suspend or stop). A suspended machine is
   * woken first: that is what makes idle auto-suspend invisible.
   */
  private async agentFor(
    p: Principal,
    idOrName: string,
    kind: MachineRow['kind'],
  ): Promise<{ m: Machine; row: MachineRow; agent: AgentConnection }> {
    return this.locked(p, idOrName, kind, async (m, row) => {
      let now = row;
      if (now.state === 'suspended') {
        await resumeMachine(this.cx, m);
        now = this.find(p, row.id, kind);
      }
      m.touch();
      return { m, row: now, agent: this.rt.agentOf(now) };
    });
  }

  async exec(p: Principal, idOrName: string, req: ExecRequest): Promise<ExecResult> {
    const { m, row, agent } = await this.agentFor(p, idOrName, 'machine');
    const ops = new GuestOps(agent, { kind: 'machine', id: row.id }, {}, () => {});
    const t0 = performance.now();
    try {
      const r = await ops.execBuffered(
        {
          argv: req.argv,
          ...(req.env ? { env: req.env } : {}),
          ...(req.cwd ? { cwd: req.cwd } : {}),
          ...(req.stdin !== undefined ? { stdinData: req.stdin } : {}),
          ...(req.timeoutMs ? { timeoutMs: req.timeoutMs } : {}),
        },
        { maxOutputBytes: this.config.execMaxOutputBytes, allowance: this.execOutput, signal: req.signal },
      );
      return {
        exit_code: r.exitCode,
        signal: r.signal,
        timed_out: r.timedOut,
        stdout: new HeldText(r.stdout, this.execOutput),
        stderr: new HeldText(r.stderr, this.execOutput),
        truncated: r.truncated,
        duration_ms: Math.round(performance.now() - t0),
      };
    } catch (e) {
      // The agent went away because the machine stopped running: say that instead.
      const now = this.store.get(row.id);
      if (e instanceof HutchError && e.code === 'AGENT_UNAVAILABLE' && now && now.state !== 'running')
        throw new HutchError(
          'MACHINE_NOT_RUNNING',
          `machine ${row.id} became ${now.state} while the command ran; the command was stopped`,
        );
      throw e;
    } finally {
      m.touch();
    }
  }

  /**
   * The agent of a running machine, for work that streams (exec with live output, terminals,
   * file transfer). While the session is open the machine never counts as idle; `release` ends
   * that (call it exactly once).
   */
  async openSession(p: Principal, idOrName: string): Promise<GuestOps> {
    const s = await this.session(p, idOrName, 'machine');
    return new GuestOps(s.agent, { kind: 'machine', id: s.id }, {}, s.release);
  }

  private async session(
    p: Principal,
    idOrName: string,
    kind: MachineRow['kind'],
  ): Promise<{ id: string; agent: AgentConnection; row: MachineRow; release: () => void }> {
    const { m, row, agent } = await this.agentFor(p, idOrName, kind);
    m.sessions++;
    let released = false;
    return {
      id: row.id,
      agent,
      row,
      release: () => {
        if (released) return;
        released = true;
        m.sessions--;
        m.touch();
      },
    };
  }

  /**
   * A connection to TCP `port` on the loopback of the caller's running machine or box (a web
   * preview of a server bound to 127.0.0.1 or ::1): a Duplex with backpressure both ways,
   * end() half-closes, destroy() closes. The machine counts as in use while it is open.
   * PORT_NOT_LISTENING when nothing accepts there.
   */
  async openPort(p: Principal, idOrName: string, port: number): Promise<Duplex> {
    checkPort(port);
    const row = this.findAny(p, idOrName);
    const s = await this.session(p, row.id, row.kind);
    return openGuestPort(s.agent, { kind: row.kind, id: row.id }, port, s.release);
  }

  /** The TCP ports something listens on in the caller's running machine or box, sorted. */
  async listeningPorts(p: Principal, idOrName: string): Promise<number[]> {
    const row = this.findAny(p, idOrName);
    const { m, agent } = await this.agentFor(p, row.id, row.kind);
    try {
      return await guestListeningPorts(agent, { kind: row.kind, id: row.id });
    } finally {
      m.touch();
    }
  }

  /** The serial console of a running (or paused) machine: recent output, live output, input. */
  consoleOf(p: Principal, idOrName: string): { id: string; console: ConsoleTap } {
    const row = this.find(p, idOrName);
    const vm = this.registry.get(row.id)?.vm;
    if (!vm || (row.state !== 'running' && row.state !== 'paused'))
      throw new HutchError('MACHINE_NOT_RUNNING', `machine ${row.id} is ${row.state}`);
    return { id: row.id, console: vm.console };
  }

  // ---- boxes (REST /v1/boxes) ---------------------------------------------------------------

  boxLimits(): ReturnType<typeof boxLimits> {
    return boxLimits(this.cx);
  }

  listBoxes(p: Principal, status?: string): BoxView[] {
    return this.store
      .list(p.user)
      .filter((r) => r.kind === 'box')
      .map((r) => this.boxView(this.withCause(r)))
      .filter((b) => status === undefined || b.status === status);
  }

  getBox(p: Principal, idOrName: string): BoxView {
    return this.boxView(this.find(p, idOrName, 'box'));
  }

  async createBox(p: Principal, req: CreateBoxRequest): Promise<BoxView> {
    return this.boxView(await createBox(this.cx, p, req));
  }

  /**
   * A live branch of a running or paused box (a suspended one is woken first, as on any use):
   * same memory, processes and files, its own id, name and copy of the disk.
   */
  async forkBox(
    p: Principal,
    idOrName: string,
    req: { name?: string },
  ): Promise<BoxView & { forked_from: string; boot_ms: number }> {
    const source = await this.locked(p, idOrName, 'box', async (m, row) => {
      if (row.state === 'suspended') await resumeMachine(this.cx, m);
      m.touch();
      return row.id;
    });
    const r = await branchMachine(this.cx, p, this.find(p, source, 'box'), req);
    return { ...this.boxView(r), forked_from: source, boot_ms: r.boot_ms ?? 0 };
  }

  async suspendBox(p: Principal, idOrName: string): Promise<BoxView & { suspend_us: number }> {
    const r = await this.locked(p, idOrName, 'box', (m) => suspendMachine(this.cx, m));
    return { ...this.boxView(r.row), suspend_us: r.us };
  }

  async resumeBox(p: Principal, idOrName: string): Promise<BoxView & { resume_us: number }> {
    const r = await this.locked(p, idOrName, 'box', (m) => resumeMachine(this.cx, m));
    return { ...this.boxView(r.row), resume_us: r.us };
  }

  async rebootBox(p: Principal, idOrName: string): Promise<BoxView> {
    return this.boxView(await this.locked(p, idOrName, 'box', (m) => rebootBox(this.cx, m, p.quota)));
  }

  setBoxTimers(p: Principal, idOrName: string, t: BoxTimers): BoxView {
    const row = this.find(p, idOrName, 'box');
    return this.boxView(setBoxTimers(this.cx, this.rt.machine(row), row, t));
  }

  /** The serial console of a running (or paused) box: what its `cmd` and kernel print. */
  boxConsoleOf(p: Principal, idOrName: string): { id: string; console: ConsoleTap } {
    const row = this.find(p, idOrName, 'box');
    const vm = this.registry.get(row.id)?.vm;
    if (!vm || (row.state !== 'running' && row.state !== 'paused'))
      throw new HutchError('BOX_NOT_RUNNING', `box ${row.id} is ${row.state}`);
    return { id: row.id, console: vm.console };
  }

  // ---- user templates ------------------------------------------------------------------------

  async createTemplate(p: Principal, req: CreateTemplate): Promise<TemplateView> {
    return toTemplateView(await createTemplate(this.cx, p, req));
  }

  listTemplates(p: Principal): TemplateView[] {
    return this.store.listTemplates(p.user).map(toTemplateView);
  }

  getTemplate(p: Principal, idOrName: string): TemplateView {
    return toTemplateView(findTemplate(this.store, p, idOrName));
  }

  deleteTemplate(p: Principal, idOrName: string): void {
    deleteTemplate(this.cx, p, idOrName);
  }

  async stopBox(p: Principal, idOrName: string): Promise<BoxView> {
    return this.boxView(await this.locked(p, idOrName, 'box', (m) => stopBox(this.cx, m)));
  }

  async startBox(p: Principal, idOrName: string): Promise<BoxView> {
    return this.boxView(await this.locked(p, idOrName, 'box', (m) => startBox(this.cx, m, p.quota)));
  }

  /** Removes a box and its disk. A running box only with `force` (it is not stopped first). */
  async removeBox(p: Principal, idOrName: string, force: boolean): Promise<void> {
    await this.locked(p, idOrName, 'box', async (m, row) => {
      if (!force && row.state !== 'stopped')
        throw new HutchError(
          'BOX_RUNNING',
          `box ${row.id} is ${row.state}: stop it first, or remove it with ?force=true`,
        );
      this.execs.failAll(row.id, 'the box was removed');
      await this.rt.end(m, 'deleted');
    });
  }

  /** Removes stopped boxes that have been stopped for at least `olderThanSeconds`. */
  async gcBoxes(p: Principal, olderThanSeconds: number): Promise<{ removed: number; ids: string[] }> {
    const cutoff = Date.now() - olderThanSeconds * 1000;
    const ids: string[] = [];
    for (const r of this.store.list(p.user)) {
      if (r.kind !== 'box' || r.state !== 'stopped' || Date.parse(r.stopped_at ?? r.created_at) > cutoff)
        continue;
      const m = this.rt.machine(r);
      if (m.lock.busy) continue;
      await m.lock.run(async () => {
        if (this.store.get(r.id)?.state !== 'stopped') return;
        await this.rt.end(m, 'deleted');
        ids.push(r.id);
      });
    }
    return { removed: ids.length, ids };
  }

  /**
   * Starts a command in a box and returns at once; its output goes to the exec's event log
   * (replayed to every reader of /events). A program that cannot be started is EXEC_FAILED.
   */
  async startExec(p: Principal, idOrName: string, req: BoxExecRequest): Promise<ExecView> {
    const { m, row, agent } = await this.agentFor(p, idOrName, 'box');
    const view = await this.execs.start(row, agent, req);
    m.touch();
    return view;
  }

  listExecs(p: Principal, boxRef: string): ExecView[] {
    return this.execs.list(this.find(p, boxRef, 'box'));
  }

  getExec(p: Principal, boxRef: string, execId: string): ExecView {
    return this.execs.get(this.find(p, boxRef, 'box'), execId);
  }

  /** Every event of an exec from the first one, then live ones until its exit event. */
  execEvents(p: Principal, boxRef: string, execId: string): AsyncGenerator<ExecEvent> {
    return this.execs.events(this.find(p, boxRef, 'box'), execId);
  }

  /** Ends a running exec (SIGKILL to its process group); a finished one is left as it is. */
  cancelExec(p: Principal, boxRef: string, execId: string): Promise<ExecView> {
    return this.execs.cancel(this.find(p, boxRef, 'box'), execId);
  }

  /**
   * Guest operations in a running box, for streaming work (files, terminals; see openSession):
   * commands and terminals get the box's environment and workdir.
   */
  async openBoxSession(p: Principal, idOrName: string): Promise<GuestOps> {
    const s = await this.session(p, idOrName, 'box');
    const spec = boxSpecOf(s.row);
    return new GuestOps(
      s.agent,
      { kind: 'box', id: s.id },
      { env: execEnv(spec, undefined), cwd: spec.workdir },
      s.release,
    );
  }

  /** Ephemeral run: a box for one command, removed afterwards whatever happened. */
  runOnce(p: Principal, req: CreateBox & { cmd: string[]; timeoutMs?: number }): Promise<RunResult> {
    return runOnce(this.cx, p, req, this.execOutput);
  }

  // ---- the sweeper ---------------------------------------------------------------------------

  /** Safety net for timers and deaths nobody reported: runs every 500 ms. */
  private sweep(): void {
    this.cx.pool.shrinkUnderPressure();
    this.execs.flush();
    this.rt.background('disk pause check', {}, () => this.diskPauses.check());
    sweepMachines(this.cx);
  }

  /**
   * Stops the engine. Machines keep running: a restarted daemon adopts them. (Their TTLs are
   * enforced again as soon as it is back.)
   */
  async close(): Promise<void> {
    this.closing = true;
    if (this.sweeper) clearInterval(this.sweeper);
    await this.cx.pool.close();
    // A snapshot being taken has a QEMU of its own: let it finish rather than orphan it.
    await this.snapshots.settle();
    const machines = this.registry.all();
    await Promise.allSettled(machines.map((m) => m.ending ?? Promise.resolve()));
    for (const m of machines) {
      this.rt.clearTtl(m);
      await m.cleanup.run('detach');
    }
    this.store.close();
    this.disks.close();
    this.gateway.close();
  }
}

function lookupUser(name: string): RunAs | undefined {
  try {
    const line = readFileSync('/etc/passwd', 'utf8')
      .split('\n')
      .find((l) => l.startsWith(`${name}:`));
    if (!line) return undefined;
    const [, , uid, gid] = line.split(':');
    return { user: name, uid: Number(uid), gid: Number(gid) };
  } catch {
    return undefined;
  }
}
