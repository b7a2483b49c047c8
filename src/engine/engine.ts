import { randomBytes } from 'node:crypto';
import {
  chownSync,
  constants,
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  realpathSync,
  rmSync,
  statSync,
} from 'node:fs';
import { join } from 'node:path';
import { inBackground, type Log } from '../background.js';
import type { Config } from '../config.js';
import { HutchError, orStorageFull } from '../errors.js';
import {
  type AgentConnection,
  AgentError,
  connectAgent,
  type ExecHandle,
} from '../guest/agent-connection.js';
import type { TemplateManifest } from '../images/builder.js';
import { templateRecipes } from '../images/recipes.js';
import {
  prepareRunDir,
  SnapshotCache,
  type SnapshotParams,
  type TemplateSnapshot,
  traversableByQemu,
} from '../images/snapshots.js';
import type { AccelChoice } from '../vmm/accel.js';
import { connectWhileAlive } from '../vmm/boot-wait.js';
import {
  cgroupSupport,
  confine,
  listMachineCgroups,
  machineLimits,
  memoryProcsFiles,
  prepareCgroup,
  releaseCgroup,
} from '../vmm/cgroup.js';
import { ConsoleTap } from '../vmm/console.js';
import { createOverlay } from '../vmm/disk.js';
import { tcgTimingArgs } from '../vmm/host.js';
import {
  type CopyOptions,
  copyMemoryFile,
  createMemoryFile,
  launchOrForget,
  memoryDirOf,
  memoryFileOf,
  prepareMemoryDir,
  removeMemoryFile,
  sweepMemoryFiles,
} from '../vmm/memory-file.js';
import {
  branchTimings,
  loadState,
  type MachineSave,
  type MachineSaved,
  saveMachine,
} from '../vmm/migration.js';
import {
  type Accel,
  isAlive,
  isQemuOf,
  killAndWait,
  launchQemu,
  listHutchQemus,
  runPaths,
  stopQemu,
  type VmSpec,
} from '../vmm/qemu.js';
import { QmpClient } from '../vmm/qmp.js';
import { type Volume, validateVolumes } from '../vmm/volumes.js';
import { type BoxExecRequest, BoxExecs, execEnv, execError } from './box-execs.js';
import {
  type BoxSpec,
  type BoxView,
  type BoxVolume,
  boxSpecOf,
  type ExecView,
  toBoxView,
} from './box-view.js';
import { DiskPauses } from './disk-pauses.js';
import { checkDiskRoom, type DiskClaim, type DiskRoom, diskRoom } from './disk-room.js';
import type { ExecEvent } from './exec-log.js';
import { newBoxId, newMachineId } from './ids.js';
import { type MachineView, toView } from './machine-view.js';
import { HeldText, OutputBudget } from './output-budget.js';
import { activeStates, type MachineRow, Store } from './store.js';

export const ttlBounds = { min: 15, max: 900, default: 60 } as const;

/** Agent link retries: 250 ms doubling to 30 s; a link up for 10 s is healthy again. */
const agentBackoffMs = 250;
const agentBackoffMaxMs = 30_000;
const agentHealthyMs = 10_000;
/** Consecutive failed reconnects (about 5 minutes of backoff) before the machine is failed. */
const agentMaxFailures = 16;

export interface CreateMachine {
  template: string;
  ttlSeconds?: number;
  persistent?: boolean;
  name?: string;
  net?: boolean;
  /** snapshot: restore from the template's snapshot (default when it exists); cold: boot. */
  mode?: 'snapshot' | 'cold';
  /** Idle seconds before auto-suspend; 0 never; absent: the server default. */
  autoSuspendSeconds?: number;
}

export interface ExecRequest {
  argv: string[];
  env?: Record<string, string>;
  cwd?: string;
  stdin?: string;
  timeoutMs?: number;
}

export interface ExecResult {
  exit_code: number | null;
  signal: number | null;
  timed_out: boolean;
  /** Held until the reply is written (see output-budget.ts). */
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
  snapshots: Record<string, 'ready' | 'building' | 'failed' | 'none'>;
  pool: Record<string, { ready: number; target: number }>;
  guest_memory_mb: { used: number; cap: number };
  max_machines: number;
  uptime_s: number;
  disk: DiskRoom;
}

/** What the engine holds for a live machine beyond its row: connections and timers. */
interface Live {
  agent?: AgentConnection;
  qmp?: QmpClient;
  console: ConsoleTap;
  ttl?: NodeJS.Timeout;
  pid: number;
  runDir: string;
  jail?: MachineView['jail'];
}

/** A restored, warmed, paused machine waiting to be handed out by a create. */
interface Pooled {
  row: MachineRow;
  live: Live;
}

/** A bootable image for boxes: a kernel and root disk like a template's, plus the OCI config. */
export interface BootImage extends TemplateManifest {
  ref: string;
  digest: string;
  env: string[];
  workdir: string | null;
}

/** Turns an image reference into a bootable image (pulling or building it; cached). */
export interface ImageResolver {
  resolve(ref: string): Promise<BootImage>;
}

/** Box snapshots are taken on a disk of the spec's default size (8 GiB). */
const boxSnapshotDiskBytes = 8 * 1024 ** 3;

export interface CreateBox {
  image: string;
  name?: string;
  cpu: number;
  memoryMb: number;
  diskSizeGb: number;
  network: boolean;
  /** Absent: the image's WorkingDir, else /root. */
  workdir?: string;
  env: Record<string, string> | null;
  volumes: BoxVolume[] | null;
}

export interface RunResult {
  exit_code: number | null;
  stdout: HeldText;
  stderr: HeldText;
  error_message: string | null;
  /** As an exec's: completed, timed_out or failed (could not start); with the killing signal. */
  status: 'completed' | 'timed_out' | 'failed';
  signal: number | null;
}

/**
 * The one place that changes machine state. API adapters parse and validate, then call these
 * methods; nothing else touches QEMU, the store or the run directories.
 */
export class Engine {
  private readonly store: Store;
  private readonly live = new Map<string, Live>();
  private readonly startedAt = Date.now();
  private sweeper: NodeJS.Timeout | undefined;
  private readonly runRoot: string;
  private readonly runAs: { user: string; uid: number; gid: number } | undefined;
  readonly snapshots: SnapshotCache;
  private readonly cgroups = cgroupSupport();
  private closing = false;
  private readonly execs: BoxExecs;
  private readonly diskPauses: DiskPauses;
  /** Output held by buffered execs (exec, runOnce) until their replies are written. */
  private readonly execOutput: OutputBudget;
  /** Where machines' RAM files live (tmpfs): src/vmm/memory-file.ts. */
  private readonly memDir: string;

  constructor(
    private readonly config: Config,
    private readonly templates: Map<string, TemplateManifest>,
    private readonly accel: AccelChoice,
    private readonly log: Log,
    private readonly images?: ImageResolver,
  ) {
    mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
    this.runRoot = join(config.stateDir, 'run');
    mkdirSync(this.runRoot, { recursive: true, mode: 0o700 });
    this.store = new Store(join(config.stateDir, 'hutch.db'));
    this.runAs = lookupUser(config.qemuUser);
    // QEMU, once it has dropped to its user, must reach its run dir to make migration sockets,
    // and its kernel and disks in the image cache; other local users reach none of it.
    for (const d of [config.stateDir, this.runRoot]) traversableByQemu(d, this.runAs);
    mkdirSync(config.imageDir, { recursive: true });
    traversableByQemu(config.imageDir, this.runAs);
    this.snapshots = new SnapshotCache(config.imageDir);
    this.memDir = memoryDirOf(config.stateDir);
    prepareMemoryDir(this.memDir, this.runAs);
    this.diskPauses = new DiskPauses({
      stateDir: config.stateDir,
      running: () =>
        this.store
          .list()
          .filter((r) => r.state === 'running' && this.live.has(r.id))
          .map((r) => r.id),
      qmp: (id) => this.qmpOf(id),
      setError: (id, error) => this.tryUpdate(id, { error }),
      log: (level, msg, fields) => this.log(level, msg, fields),
    });
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
  }

  /** Re-adopts machines left by a previous daemon, cleans what is dead, starts the sweeper. */
  async start(): Promise<void> {
    // Exec streams live on the agent connection of the daemon that started them: a restart
    // ends them (the agent kills their processes when that connection goes).
    this.execs.endOrphans('the daemon restarted while the command ran');
    const known = new Set<string>();
    for (const row of this.store.list()) {
      known.add(row.id);
      await this.recover(row);
    }
    // QEMU processes of ours that the store does not know: a crash between launch and insert,
    // or a template snapshot whose builder died mid-way (its temp dir names the builder's pid).
    for (const q of listHutchQemus()) {
      const snapTmp = q.argv.map((a) => /\/snapshots\/[^/]*\.tmp-(\d+)/.exec(a)).find(Boolean);
      if (snapTmp && !isAlive(Number(snapTmp[1]))) {
        this.log('warn', 'killing orphan snapshot qemu', { pid: q.pid });
        await killAndWait(q.pid);
        continue;
      }
      if (!q.argv.some((a) => a.includes(this.runRoot))) continue;
      const row = this.store.get(q.id);
      if (!row || !activeStates.includes(row.state)) {
        this.log('warn', 'killing orphan qemu', { pid: q.pid, id: q.id });
        await killAndWait(q.pid);
      }
    }
    for (const dir of readdirSync(this.runRoot)) {
      if (!this.store.get(dir)) rmSync(join(this.runRoot, dir), { recursive: true, force: true });
    }
    // RAM files of machines not adopted above (their QEMU is gone): nothing maps them any more.
    for (const id of sweepMemoryFiles(this.memDir, (id) => this.live.has(id)))
      this.log('info', 'removed the memory file of a machine that is gone', { id });
    // cgroups are named by machine id, which is unique across daemons: one with no live QEMU
    // and no running row anywhere here is debris from a crash.
    const liveIds = new Set(listHutchQemus().map((q) => q.id));
    for (const name of listMachineCgroups()) {
      if (!liveIds.has(name)) await releaseCgroup(name, 100);
    }
    this.sweeper = setInterval(() => this.background('sweep', {}, () => this.sweep()), 500);
    this.sweeper.unref();
  }

  private async recover(row: MachineRow): Promise<void> {
    const alive = row.pid !== null && isQemuOf(row.pid, row.id);
    const adopt = (pid: number): Live => this.attach(row, pid);
    if (row.state === 'running' && alive && row.pid !== null) {
      const live = adopt(row.pid);
      try {
        // Stopped by a full host disk (werror=enospc) while we were away: retry its write now.
        const qmp = await this.qmpOf(row.id);
        if ((await qmp.execute<{ status: string }>('query-status')).status === 'io-error')
          await qmp.execute('cont');
        live.agent = await connectAgent(runPaths(row.run_dir).agent, { timeoutMs: 10_000 });
        this.watchAgent(row.id, live.agent);
        this.armTtl(row);
        this.log('info', 'adopted running machine', { id: row.id, pid: row.pid });
      } catch (e) {
        this.log('warn', 'running machine does not answer; destroying it', {
          id: row.id,
          error: (e as Error).message,
        });
        await this.teardown(
          row,
          'failed',
          `agent did not answer after daemon restart: ${(e as Error).message}`,
        );
      }
      return;
    }
    if (row.state === 'paused' && alive && row.pid !== null) {
      // A paused guest cannot answer its agent; the connection is made on resume.
      adopt(row.pid);
      this.armTtl(row);
      this.log('info', 'adopted paused machine', { id: row.id, pid: row.pid });
      return;
    }
    const stateFile = join(row.run_dir, 'suspend.state');
    // A state file still being written when the daemon died is never complete: drop it.
    for (const partial of [`${stateFile}.partial`, join(row.run_dir, 'branch.state.partial')])
      rmSync(partial, { force: true });
    // Its memory is copied before the state is written: without the state it is debris.
    if (!existsSync(stateFile)) removeMemoryFile(join(row.run_dir, 'suspend.ram'));
    if (row.state === 'suspending' && alive && row.pid !== null) {
      if (existsSync(stateFile)) {
        // The snapshot was complete (it is renamed into place last): finish the suspend.
        await stopQemu(row.pid, runPaths(row.run_dir).qmp);
        await releaseCgroup(row.id);
        this.store.update(row.id, { state: 'suspended', pid: null });
        this.armTtl(row);
      } else {
        // Crashed mid-snapshot: the source carries on as it was.
        const live = adopt(row.pid);
        try {
          const qmp = await this.qmpOf(row.id);
          await qmp.execute('cont');
          live.agent = await connectAgent(runPaths(row.run_dir).agent, { timeoutMs: 10_000 });
          this.watchAgent(row.id, live.agent);
          this.store.update(row.id, { state: 'running' });
          this.armTtl(row);
        } catch (e) {
          await this.teardown(
            row,
            'failed',
            `interrupted suspend could not be undone: ${(e as Error).message}`,
          );
        }
      }
      return;
    }
    if (row.state === 'resuming' || (row.state === 'suspending' && !alive)) {
      if (alive && row.pid !== null) await stopQemu(row.pid, runPaths(row.run_dir).qmp, 200);
      await releaseCgroup(row.id);
      if (existsSync(stateFile)) {
        this.store.update(row.id, { state: 'suspended', pid: null });
        this.armTtl(row);
      } else {
        await this.teardown(row, 'failed', 'the machine was lost while it was being suspended');
      }
      return;
    }
    if (row.state === 'suspended' || row.state === 'failed') {
      this.armTtl(row);
      return;
    }
    if (
      row.kind === 'box' &&
      (row.state === 'stopped' || row.state === 'stopping' || row.state === 'starting')
    ) {
      // A box caught mid-stop or mid-restart keeps its disk and is simply stopped; one caught
      // mid-create (it never ran) is removed like a machine.
      if (row.state === 'starting' && row.started_at === null) {
        await this.teardown(row, 'deleted');
        return;
      }
      if (alive && row.pid !== null) await stopQemu(row.pid, runPaths(row.run_dir).qmp);
      await releaseCgroup(row.id);
      if (row.state !== 'stopped')
        this.store.update(row.id, { state: 'stopped', pid: null, stopped_at: new Date().toISOString() });
      return;
    }
    // starting (daemon died mid-create), destroying (mid-destroy), or running/paused but QEMU is gone.
    if (row.state === 'running' || row.state === 'paused') {
      await this.teardown(row, 'failed', 'qemu exited while the daemon was down');
    } else {
      await this.teardown(row, 'deleted');
    }
  }

  /**
   * Takes each template's snapshot in the background (once: it is cached with the template).
   * Until it is ready, creates boot cold.
   */
  prepareSnapshots(): void {
    for (const manifest of this.templates.values()) {
      this.snapshots.ensure(manifest, this.snapshotParams(manifest)).then(
        (s) => {
          this.log('info', 'template snapshot ready', { template: s.template, state_bytes: s.stateBytes });
          this.schedulePoolRefill();
        },
        (e: unknown) =>
          this.log('error', 'template snapshot failed', {
            template: manifest.name,
            error: (e as Error).message,
          }),
      );
    }
  }

  health(): Health {
    const rows = this.store.list();
    const active = rows.filter((r) => activeStates.includes(r.state));
    const templates: Record<string, 'ready' | 'not built'> = {};
    const snapshots: Health['snapshots'] = {};
    for (const name of Object.keys(templateRecipes)) {
      templates[name] = this.templates.has(name) ? 'ready' : 'not built';
      snapshots[name] = this.snapshots.status(name);
    }
    return {
      status: 'ok',
      running: rows.filter((r) => r.state === 'running').length,
      machines: rows.length,
      accel: this.accel.accel,
      accel_reason: this.accel.reason,
      templates,
      snapshots,
      pool: this.poolStatus(),
      guest_memory_mb: {
        used: active.reduce((s, r) => s + r.memory_mb, 0),
        cap: this.config.maxGuestMemoryMb,
      },
      max_machines: this.config.maxMachines,
      uptime_s: Math.round((Date.now() - this.startedAt) / 1000),
      disk: this.diskRoom(),
    };
  }

  private view(row: MachineRow): MachineView {
    return toView(row, this.config.autoSuspendSeconds);
  }

  list(owner: string): MachineView[] {
    return this.store
      .list(owner)
      .filter((r) => r.kind === 'machine')
      .map((r) => this.view(this.withCause(r)));
  }

  /** A row with the cause the engine knows of now, even when the store could not record it. */
  private withCause(row: MachineRow): MachineRow {
    const cause = this.diskPauses.cause(row.id);
    return cause ? { ...row, error: cause } : row;
  }

  get(owner: string, idOrName: string): MachineView {
    return this.view(this.find(owner, idOrName));
  }

  private find(owner: string, idOrName: string): MachineRow {
    const row = this.store.get(idOrName) ?? this.store.findByName(owner, idOrName);
    if (!row || row.owner !== owner || row.kind !== 'machine')
      throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(idOrName)}`);
    return this.withCause(row);
  }

  private findBox(owner: string, idOrName: string): MachineRow {
    const row = this.store.get(idOrName) ?? this.store.findByName(owner, idOrName);
    if (!row || row.owner !== owner || row.kind !== 'box')
      throw new HutchError('BOX_NOT_FOUND', `no box ${JSON.stringify(idOrName)}`);
    return this.withCause(row);
  }

  async create(owner: string, req: CreateMachine): Promise<MachineView> {
    const t0 = performance.now();
    if (this.closing) throw new HutchError('AGENT_UNAVAILABLE', 'the daemon is shutting down');
    if (!templateRecipes[req.template])
      throw new HutchError(
        'TEMPLATE_NOT_FOUND',
        `no template named ${JSON.stringify(req.template)}; known: ${Object.keys(templateRecipes).join(', ')}`,
      );
    const manifest = this.templates.get(req.template);
    if (!manifest) throw new HutchError('TEMPLATE_NOT_READY', `template ${req.template} is not built yet`);
    if (req.net)
      throw new HutchError(
        'NETWORK_UNAVAILABLE',
        'guest networking ("net": true) is not available in this version; machines have no network',
      );
    if (req.name !== undefined && this.store.findByName(owner, req.name))
      throw new HutchError('NAME_TAKEN', `a machine named ${JSON.stringify(req.name)} already exists`);

    const pooled = req.mode === 'cold' ? undefined : this.takePooled(req.template);
    if (pooled) return this.handOut(owner, req, pooled, t0);
    const snap = req.mode === 'cold' ? undefined : this.snapshots.get(req.template);
    if (req.mode === 'snapshot' && !snap)
      throw new HutchError(
        'SNAPSHOT_NOT_READY',
        `template ${req.template} has no snapshot yet (${this.snapshots.status(req.template)}); omit "mode" to cold-boot`,
      );
    const persistent = req.persistent === true && this.config.allowPersistent;
    const ttl = clampTtl(req.ttlSeconds);
    const id = newMachineId();
    const runDir = join(this.runRoot, id);
    const row: MachineRow = {
      id,
      owner,
      name: req.name ?? null,
      template: req.template,
      template_hash: manifest.hash,
      state: 'starting',
      mode: snap ? 'snapshot' : 'cold',
      accel: this.accel.accel,
      vcpus: this.config.machineVcpus,
      memory_mb: this.config.machineMemoryMb,
      ...lifetime(persistent, ttl),
      boot_ms: null,
      pid: null,
      run_dir: runDir,
      error: null,
      jail: null,
      auto_suspend_seconds: req.autoSuspendSeconds ?? null,
      parent_id: null,
      kind: 'machine',
      spec: null,
      started_at: null,
      stopped_at: null,
    };
    await this.admitUser(row, this.diskBytesOf(row));

    try {
      const disk = join(runDir, 'disk.qcow2');
      if (snap) {
        prepareRunDir(runDir, this.runAs);
        await createOverlay(snap.disk, disk, 'qcow2', this.runAs);
        const { live } = await this.restoreInto(row, manifest, snap.state, {
          memoryFrom: snap.mem,
          ignoreShared: true,
        });
        if (live.agent) await this.giveIdentity(live.agent, id);
      } else {
        prepareRunDir(runDir, this.runAs);
        await createOverlay(manifest.rootfs, disk, 'raw', this.runAs);
        const live = this.launch(row, manifest, {});
        live.agent = await this.waitForAgent(id, live.pid, runDir, live.console);
      }
      return this.markRunning(id, Math.round(performance.now() - t0));
    } catch (e) {
      return this.bootFailed(id, 'machine', e);
    }
  }

  /** A create that failed: everything it made is removed; the error keeps the console's last words. */
  private async bootFailed(id: string, what: 'machine' | 'box', e: unknown): Promise<never> {
    const tail = this.live.get(id)?.console.recent().toString('utf8').slice(-1500) ?? '';
    const current = this.store.get(id);
    if (current) await this.teardown(current, 'deleted');
    if (e instanceof HutchError) throw e;
    throw orStorageFull(e, 'BOOT_FAILED', `${what} did not boot: ${(e as Error).message}`, {
      console_tail: tail,
    });
  }

  /** Starts QEMU for `row` and starts watching its console. */
  private launch(
    row: MachineRow,
    manifest: TemplateManifest,
    extra: Pick<VmSpec, 'incoming' | 'volumes'>,
  ): Live {
    // Its own RAM file, shared: a cold boot starts from an empty one, a restore from the copy
    // restoreInto made (or an empty one, filled by the migration stream).
    const memory = this.memoryOf(row.id);
    if (!extra.incoming || !existsSync(memory)) createMemoryFile(memory, row.memory_mb * 2 ** 20, this.runAs);
    const pid = launchOrForget(memory, () =>
      launchQemu(this.config.qemuBinary, {
        memory: { kind: 'file', path: memory, share: true },
        id: row.id,
        accel: row.accel as Accel,
        vcpus: row.vcpus,
        memoryMb: row.memory_mb,
        kernel: manifest.kernel,
        disk: join(row.run_dir, 'disk.qcow2'),
        cmdline: `${this.kernelCmdline(manifest)} hutch.hostname=${hostnameOf(row.id)}`,
        runDir: row.run_dir,
        ...(this.runAs ? { runAs: this.runAs.user } : {}),
        ...extra,
      }),
    );
    const jail = this.confine(row.id, pid, row);
    this.store.update(row.id, { pid, jail: JSON.stringify(jail) });
    return this.attach(row, pid, jail);
  }

  /** Registers a running QEMU as live: console tap started, a pending TTL timer taken over. */
  private attach(row: MachineRow, pid: number, jail?: MachineView['jail']): Live {
    const console = new ConsoleTap(runPaths(row.run_dir).console, join(row.run_dir, 'console.log'));
    console.start();
    const live: Live = { console, pid, runDir: row.run_dir, ...(jail ? { jail } : {}) };
    const timer = this.orphanTimers.get(row.id);
    if (timer) {
      live.ttl = timer;
      this.orphanTimers.delete(row.id);
    }
    this.live.set(row.id, live);
    return live;
  }

  /**
   * Starts QEMU for `row` waiting for a migration stream, loads `stateFile`, continues the
   * vCPUs and connects to the agent, which forgets any stream the saved machine had open.
   */
  private async restoreInto(
    row: MachineRow,
    manifest: TemplateManifest,
    stateFile: string,
    opts: { memoryFrom?: string; ignoreShared: boolean },
  ): Promise<{ live: Live; restoredUs: number; agentUs: number }> {
    if (opts.memoryFrom)
      await copyMemoryFile(opts.memoryFrom, this.memoryOf(row.id), {
        owner: this.runAs,
        chargeTo: this.chargeTo(row),
      });
    const live = this.launch(row, manifest, { incoming: true });
    const qmp = await this.qmpOf(row.id);
    const t0 = performance.now();
    await loadState(qmp, runPaths(row.run_dir).migDir, stateFile, { ignoreShared: opts.ignoreShared });
    await qmp.execute('cont');
    const t1 = performance.now();
    const restoredUs = Math.round((t1 - t0) * 1000);
    live.agent = await this.waitForAgent(row.id, live.pid, row.run_dir, live.console);
    await live.agent.reset();
    return { live, restoredUs, agentUs: Math.round((performance.now() - t1) * 1000) };
  }

  private markRunning(id: string, bootMs: number): MachineView {
    const live = this.live.get(id);
    if (!live?.agent) throw new Error(`machine ${id} has no agent connection`);
    this.store.update(id, {
      state: 'running',
      boot_ms: bootMs,
      started_at: new Date().toISOString(),
      stopped_at: null,
      error: null,
    });
    this.watchAgent(id, live.agent);
    const final = this.store.get(id);
    if (!final) throw new Error('machine vanished during create');
    this.armTtl(final);
    this.touch(id);
    this.log('info', 'machine started', { id, mode: final.mode, boot_ms: bootMs });
    return this.view(final);
  }

  /** The machine's RAM file (it exists while its QEMU runs). */
  private memoryOf(id: string): string {
    return memoryFileOf(this.memDir, id);
  }

  /** The kernel command line for this host: the template's, plus TCG's timing flags. */
  private kernelCmdline(manifest: TemplateManifest): string {
    return this.accel.accel === 'tcg'
      ? `${manifest.cmdline} ${tcgTimingArgs(manifest.kernelHz)}`
      : manifest.cmdline;
  }

  /** The parameters template snapshots are taken with; a snapshot only fits machines booted alike. */
  snapshotParams(manifest: TemplateManifest): SnapshotParams {
    return {
      qemu: this.config.qemuBinary,
      accel: this.accel.accel,
      vcpus: this.config.machineVcpus,
      memoryMb: this.config.machineMemoryMb,
      cmdline: this.kernelCmdline(manifest),
      runAs: this.runAs,
    };
  }

  /**
   * Makes a restored machine its own: every clone of a snapshot starts with the snapshot's
   * hostname, machine-id, kernel RNG state and a clock stopped at snapshot time.
   */
  private async giveIdentity(agent: AgentConnection, id: string): Promise<void> {
    await agent.configure(
      {
        hostname: hostnameOf(id),
        machineId: randomBytes(16).toString('hex'),
        entropy: randomBytes(64),
        timeNs: BigInt(Date.now()) * 1_000_000n,
      },
      10_000,
    );
  }

  private confine(id: string, pid: number, row: MachineRow): MachineView['jail'] {
    const jail = { seccomp: true, user: this.runAs?.user ?? null, cgroup: null as string | null };
    if (this.cgroups === 'none') return jail;
    try {
      jail.cgroup = confine(id, pid, machineLimits(row.memory_mb, row.vcpus)).kind;
    } catch (e) {
      this.log('warn', 'cgroup confinement failed', { id, error: (e as Error).message });
    }
    return jail;
  }

  /** The cgroup a copy of `row`'s RAM is written from (made before its QEMU), when there is one. */
  private chargeTo(row: MachineRow): string[] | undefined {
    if (this.cgroups === 'none') return undefined;
    try {
      return memoryProcsFiles(prepareCgroup(row.id, machineLimits(row.memory_mb, row.vcpus)));
    } catch (e) {
      this.log('warn', 'cgroup confinement failed', { id: row.id, error: (e as Error).message });
      return undefined;
    }
  }

  /** The machine's QMP connection, opened on first use and kept (QEMU serves one client at a time). */
  private async qmpOf(id: string): Promise<QmpClient> {
    const live = this.live.get(id);
    if (!live) throw new HutchError('MACHINE_NOT_RUNNING', `machine ${id} is not running`);
    if (live.qmp?.isOpen()) return live.qmp;
    live.qmp = await QmpClient.connect(runPaths(live.runDir).qmp, 5000);
    return live.qmp;
  }

  /**
   * Whether one more machine fits, called inside the transaction that inserts it. Every QEMU of
   * this daemon counts: users' machines, the warm pool's and snapshots being taken (the pool
   * yields to users first: see yieldPool). `diskBytes` is the new machine's disk size, promised
   * against the host's free space; 0 when its disk already exists (a box starting again).
   */
  private admit(active: MachineRow[], row: MachineRow, diskBytes: number): void {
    const over = this.overCaps(active, row.memory_mb);
    if (over) throw new HutchError('RESOURCE_EXHAUSTED', over);
    if (diskBytes > 0) checkDiskRoom(this.diskRoom(), diskBytes, `${row.kind} ${row.id}`);
  }

  /** Why one more QEMU of `memoryMb` would break a cap beside `active` (and our other QEMUs). */
  private overCaps(active: MachineRow[], memoryMb: number): string | undefined {
    const extra = this.extraQemus();
    if (active.length + extra.count + 1 > this.config.maxMachines)
      return `at most ${this.config.maxMachines} machines may run at once (${active.length} running${extra.count ? `, ${extra.count} warm or being snapshotted` : ''})`;
    const used = active.reduce((s, r) => s + r.memory_mb, 0) + extra.memoryMb;
    if (used + memoryMb > this.config.maxGuestMemoryMb)
      return `guest memory cap reached: ${used} MiB in use + ${memoryMb} MiB requested > ${this.config.maxGuestMemoryMb} MiB`;
    return undefined;
  }

  /** QEMUs that are no user's machine: the warm pool (ready and being made) and snapshot builds. */
  private extraQemus(): { count: number; memoryMb: number } {
    let count = this.poolMaking + this.snapshots.inFlight();
    for (const l of this.pool.values()) count += l.length;
    return { count, memoryMb: count * this.config.machineMemoryMb };
  }

  /** Guest disk promised against the state filesystem's free space (reported by /v1/info). */
  diskRoom(): DiskRoom {
    const claims: DiskClaim[] = [];
    // A failed machine's run dir is gone; a failed box is stopped and keeps its disk.
    for (const r of this.store.list())
      if (!(r.kind === 'machine' && r.state === 'failed'))
        claims.push({ virtualBytes: this.diskBytesOf(r), file: join(r.run_dir, 'disk.qcow2') });
    for (const l of this.pool.values())
      for (const p of l)
        claims.push({ virtualBytes: this.diskBytesOf(p.row), file: join(p.row.run_dir, 'disk.qcow2') });
    return diskRoom(this.config.stateDir, claims, this.config.diskOvercommit);
  }

  /** How big a machine's disk may grow: a box's asked-for size, else its template's image. */
  private diskBytesOf(row: MachineRow): number {
    if (row.kind === 'box') return boxSpecOf(row).disk_size_gb * 1024 ** 3;
    const manifest = this.templates.get(row.template);
    if (!manifest) return 0;
    try {
      return statSync(manifest.rootfs).size;
    } catch {
      return 0;
    }
  }

  /**
   * Makes room for a user's machine by giving back pooled ones: the pool only ever holds what
   * no user is asking for. While a user waits here, the pool does not grow.
   */
  private async yieldPool(memoryMb: number): Promise<void> {
    for (let i = 0; i <= this.config.poolSize * this.templates.size + 1 && !this.hasRoomFor(memoryMb); i++) {
      const victim = [...this.pool.values()].find((l) => l.length > 0)?.pop();
      if (victim) await this.discardPooled(victim);
      else if (this.refilling && this.poolMaking > 0) await this.refilling;
      else return;
    }
  }

  /** Users between yieldPool and their insert: the pool must not take back what they freed. */
  private usersWaiting = 0;
  private poolMaking = 0;

  /** Inserts a user's machine after making room for it from the pool; admission as in admit(). */
  private async admitUser(row: MachineRow, diskBytes: number): Promise<void> {
    this.usersWaiting++;
    try {
      await this.yieldPool(row.memory_mb);
      this.insertRow(row, diskBytes);
    } finally {
      this.usersWaiting--;
    }
  }

  /** Connects to the agent, failing fast (with the console's last words) if QEMU dies first. */
  private async waitForAgent(
    id: string,
    pid: number,
    runDir: string,
    console: ConsoleTap,
  ): Promise<AgentConnection> {
    try {
      return await connectWhileAlive(
        pid,
        runDir,
        this.config.bootTimeoutMs,
        () => `console: ${console.recent().toString('utf8').slice(-300)}`,
      );
    } catch (e) {
      const m = (e as Error).message;
      throw new Error(m.startsWith('qemu exited') ? m : `${id}: ${m}`);
    }
  }

  /** Work nobody awaits: its failure is logged, never an unhandled rejection. */
  private background(what: string, fields: Record<string, unknown>, work: () => unknown): void {
    inBackground(this.log, what, fields, work);
  }

  /**
   * Watches a running machine's agent link. When QEMU died with it, the machine failed. When the
   * guest broke the protocol (or the link dropped), the machine keeps running with the cause in
   * its `error` ("agent broken: …") and the link is retried with exponential backoff, so a guest
   * that keeps corrupting its port costs the host a few reconnects a minute, not a busy loop.
   * A link that stays up for agentHealthyMs clears the error and the backoff.
   */
  private watchAgent(id: string, agent: AgentConnection): void {
    const healthy = setTimeout(() => {
      if (!agent.isOpen || this.live.get(id)?.agent !== agent) return;
      if (this.agentFailures.delete(id) && this.store.get(id)?.error?.startsWith('agent broken'))
        this.tryUpdate(id, { error: null });
    }, agentHealthyMs);
    healthy.unref();
    this.background('agent watch', { id }, async () => {
      const err = await agent.closed;
      clearTimeout(healthy);
      const live = this.live.get(id);
      if (this.store.get(id)?.state !== 'running' || !live || live.agent !== agent) return;
      // The agent connection drops when QEMU dies; tell the two apart.
      await new Promise((r) => setTimeout(r, 50));
      if (!isAlive(live.pid)) {
        const row = this.store.get(id);
        if (row)
          await this.teardown(row, 'failed', `qemu exited unexpectedly${err ? ` (${err.message})` : ''}`);
        return;
      }
      live.agent = undefined;
      await this.reconnectAgent(id, live, err?.message ?? 'the link closed');
    });
  }

  /** Consecutive agent link failures per machine (cleared by a link that stays up). */
  private readonly agentFailures = new Map<string, number>();

  private async reconnectAgent(id: string, live: Live, cause: string): Promise<void> {
    for (;;) {
      const failures = (this.agentFailures.get(id) ?? 0) + 1;
      this.agentFailures.set(id, failures);
      const delay = Math.min(agentBackoffMaxMs, agentBackoffMs * 2 ** (failures - 1));
      this.tryUpdate(id, { error: `agent broken: ${cause}`.slice(0, 500) });
      this.log('warn', 'agent link broken; reconnecting', { id, cause, failures, delay_ms: delay });
      await new Promise((r) => setTimeout(r, delay));
      const row = this.store.get(id);
      if (row?.state !== 'running' || this.live.get(id) !== live || this.closing) return;
      if (!isAlive(live.pid)) {
        await this.teardown(row, 'failed', `qemu exited unexpectedly (agent: ${cause})`);
        return;
      }
      try {
        live.agent = await connectAgent(runPaths(row.run_dir).agent, { timeoutMs: 10_000 });
        this.watchAgent(id, live.agent);
        return;
      } catch (e) {
        cause = (e as Error).message;
        if (failures >= agentMaxFailures) {
          await this.teardown(row, 'failed', `agent broken: gave up after ${failures} tries: ${cause}`);
          return;
        }
      }
    }
  }

  private armTtl(row: MachineRow): void {
    const live = this.live.get(row.id);
    if (!row.expires_at) return;
    const ms = Math.max(0, new Date(row.expires_at).getTime() - Date.now());
    const timer = setTimeout(
      () => this.background('ttl expiry', { id: row.id }, () => this.expire(row.id)),
      ms,
    );
    timer.unref();
    if (live) live.ttl = timer;
    else this.orphanTimers.set(row.id, timer);
  }

  private readonly orphanTimers = new Map<string, NodeJS.Timeout>();

  private async expire(id: string): Promise<void> {
    const row = this.store.get(id);
    if (!row?.expires_at || new Date(row.expires_at).getTime() > Date.now() + 5) return;
    this.log('info', 'machine expired', { id });
    await this.teardown(row, 'deleted');
  }

  /** Safety net for timers and deaths nobody reported: runs every 500 ms. */
  private sweep(): void {
    this.shrinkPoolUnderPressure();
    this.execs.flush();
    this.background('disk pause check', {}, () => this.diskPauses.check());
    for (const row of this.store.list()) {
      if (row.expires_at && new Date(row.expires_at).getTime() <= Date.now() && row.state !== 'destroying') {
        this.background('ttl expiry', { id: row.id }, () => this.expire(row.id));
      } else if (row.state === 'destroying' && !this.teardowns.has(row.id)) {
        // A teardown whose last write failed (a full disk): its resources are gone, the row not yet.
        this.background('destroy retry', { id: row.id }, () => this.teardown(row, 'deleted'));
      } else if (
        (row.state === 'running' || row.state === 'paused') &&
        row.pid !== null &&
        !isAlive(row.pid)
      ) {
        this.background('failure cleanup', { id: row.id }, () =>
          this.teardown(row, 'failed', 'qemu exited unexpectedly'),
        );
      } else if (row.state === 'running' && this.idleSuspendDue(row)) {
        this.suspend(row.owner, row.id).catch((e: unknown) =>
          this.log('warn', 'auto-suspend failed', { id: row.id, error: (e as Error).message }),
        );
      }
    }
  }

  async destroy(owner: string, idOrName: string): Promise<void> {
    const row = this.find(owner, idOrName);
    await this.teardown(row, 'deleted');
  }

  private readonly teardowns = new Map<string, Promise<void>>();

  /**
   * Stops a machine's QEMU and removes everything it had on the host (run directory, sockets,
   * disk overlay, cgroup). `deleted` removes the row; `failed` keeps it, marked with the reason,
   * so the owner can see what happened until they delete it or its TTL passes.
   */
  private teardown(row: MachineRow, outcome: 'deleted' | 'failed', reason?: string): Promise<void> {
    const pending = this.teardowns.get(row.id);
    if (pending) return pending;
    const p = (async () => {
      // Marked first so a daemon that dies mid-way finishes the job at its next start; on a full
      // disk the mark fails, and the teardown goes on anyway: it frees the space it needs.
      if (outcome === 'deleted') this.tryUpdate(row.id, { state: 'destroying' });
      const live = this.live.get(row.id);
      this.live.delete(row.id);
      if (live?.ttl) clearTimeout(live.ttl);
      const orphanTimer = this.orphanTimers.get(row.id);
      if (orphanTimer) clearTimeout(orphanTimer);
      await this.release(row.id, row.run_dir, live, row.pid);
      if (row.kind === 'box' && outcome === 'failed') {
        // A box's disk is its user's data: a VM that died leaves the box stopped, not gone.
        this.store.update(row.id, {
          state: 'stopped',
          error: reason ?? 'failed',
          pid: null,
          stopped_at: new Date().toISOString(),
        });
        this.log('warn', 'box stopped by a failure', { id: row.id, reason });
        return;
      }
      this.diskPauses.forget(row.id);
      rmSync(row.run_dir, { recursive: true, force: true });
      if (row.kind === 'box') this.execs.forget(row.id);
      if (outcome === 'deleted') {
        this.store.delete(row.id);
        this.lastActive.delete(row.id);
      } else {
        this.store.update(row.id, { state: 'failed', error: reason ?? 'failed', pid: null });
        const failedRow = this.store.get(row.id);
        if (failedRow) this.armTtl(failedRow);
        this.log('warn', 'machine failed', { id: row.id, reason });
      }
    })().finally(() => this.teardowns.delete(row.id));
    this.teardowns.set(row.id, p);
    return p;
  }

  /** A state write that may fail (a full disk) without stopping what it describes; logged. */
  private tryUpdate(id: string, fields: Partial<Omit<MachineRow, 'id'>>): void {
    try {
      this.store.update(id, fields);
    } catch (e) {
      this.log('warn', 'state not recorded', {
        id,
        fields: Object.keys(fields),
        error: (e as Error).message,
      });
    }
  }

  async exec(owner: string, idOrName: string, req: ExecRequest): Promise<ExecResult> {
    let row = this.find(owner, idOrName);
    // A suspended machine wakes up for work: that is what makes idle auto-suspend invisible.
    if (row.state === 'suspended') {
      await this.resume(owner, row.id);
      row = this.find(owner, row.id);
    }
    this.touch(row.id);
    const agent = this.agentOf(row);
    const t0 = performance.now();
    try {
      const r = await agent.execBuffered(
        {
          argv: req.argv,
          ...(req.env ? { env: req.env } : {}),
          ...(req.cwd ? { cwd: req.cwd } : {}),
          stdin: req.stdin !== undefined,
          ...(req.timeoutMs ? { timeoutMs: req.timeoutMs } : {}),
        },
        {
          ...(req.stdin !== undefined ? { stdin: req.stdin } : {}),
          maxOutputBytes: this.config.execMaxOutputBytes,
          allowance: this.execOutput,
        },
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
      if (e instanceof AgentError) throw execError(req.argv, e);
      const now = this.store.get(row.id);
      if (now && now.state !== 'running')
        throw new HutchError(
          'MACHINE_NOT_RUNNING',
          `machine ${row.id} became ${now.state} while the command ran; the command was stopped`,
        );
      throw new HutchError('AGENT_UNAVAILABLE', `machine ${row.id}: ${(e as Error).message}`);
    } finally {
      this.touch(row.id);
    }
  }

  /**
   * The agent of a running machine, for work that streams (exec with live output, terminals,
   * file transfer). A suspended machine is woken first, like a plain exec. While the session is
   * open the machine never counts as idle; `release` ends that (call it exactly once).
   */
  async openSession(
    owner: string,
    idOrName: string,
  ): Promise<{ id: string; agent: AgentConnection; release: () => void }> {
    let row = this.find(owner, idOrName);
    if (row.state === 'suspended') {
      await this.resume(owner, row.id);
      row = this.find(owner, row.id);
    }
    const agent = this.agentOf(row);
    const id = row.id;
    this.sessions.set(id, (this.sessions.get(id) ?? 0) + 1);
    this.touch(id);
    let released = false;
    return {
      id,
      agent: agent,
      release: () => {
        if (released) return;
        released = true;
        const n = (this.sessions.get(id) ?? 1) - 1;
        if (n <= 0) this.sessions.delete(id);
        else this.sessions.set(id, n);
        this.touch(id);
      },
    };
  }

  /** Open streaming sessions per machine: a machine with one is busy, never idle. */
  private readonly sessions = new Map<string, number>();

  /** The serial console of a running (or paused) machine: recent output, live output, input. */
  consoleOf(owner: string, idOrName: string): { id: string; console: ConsoleTap } {
    const row = this.find(owner, idOrName);
    const live = this.live.get(row.id);
    if (!live || (row.state !== 'running' && row.state !== 'paused'))
      throw new HutchError('MACHINE_NOT_RUNNING', `machine ${row.id} is ${row.state}`);
    return { id: row.id, console: live.console };
  }

  // ---- boxes (REST /v1/boxes) ---------------------------------------------------------------

  /** The limits one box may ask for, as GET /v1/info reports them. */
  boxLimits(): {
    max_cpu: number;
    max_memory_mb: number;
    max_disk_size_gb: number;
    max_boxes: number;
    volume_roots: string[];
  } {
    return {
      max_cpu: this.config.maxBoxCpu,
      max_memory_mb: this.config.maxBoxMemoryMb,
      max_disk_size_gb: this.config.maxBoxDiskGb,
      max_boxes: this.config.maxMachines,
      volume_roots: this.config.volumeRoots,
    };
  }

  listBoxes(owner: string, status?: string): BoxView[] {
    return this.store
      .list(owner)
      .filter((r) => r.kind === 'box')
      .map((r) => toBoxView(this.withCause(r)))
      .filter((b) => status === undefined || b.status === status);
  }

  getBox(owner: string, idOrName: string): BoxView {
    return toBoxView(this.findBox(owner, idOrName));
  }

  /** Checks what a box asks for against the limits and the volume allow-list; throws, changes nothing. */
  private checkBoxRequest(req: CreateBox): BoxVolume[] | null {
    const lim = this.boxLimits();
    const over = (what: string, v: number, max: number, unit = ''): HutchError =>
      new HutchError('LIMIT_EXCEEDED', `${what} ${v}${unit} is over this server's limit of ${max}${unit}`);
    if (req.cpu > lim.max_cpu) throw over('cpu', req.cpu, lim.max_cpu);
    if (req.memoryMb > lim.max_memory_mb) throw over('memory_mb', req.memoryMb, lim.max_memory_mb, ' MiB');
    if (req.diskSizeGb > lim.max_disk_size_gb)
      throw over('disk_size_gb', req.diskSizeGb, lim.max_disk_size_gb, ' GiB');
    if (req.network)
      throw new HutchError(
        'NETWORK_UNAVAILABLE',
        'guest networking ("network": true) is not available in this version; boxes have no network',
      );
    if (!req.volumes?.length) return req.volumes;
    const seen = new Set<string>();
    const checked = req.volumes.map((v) => {
      let real: string;
      try {
        real = realpathSync(v.host_path);
      } catch {
        throw new HutchError('INVALID_ARGUMENT', `volume host_path ${v.host_path} does not exist`);
      }
      if (!statSync(real).isDirectory())
        throw new HutchError('INVALID_ARGUMENT', `volume host_path ${v.host_path} is not a directory`);
      // The resolved path, so a symlink inside an allowed root cannot lead outside it.
      const allowed = this.config.volumeRoots.some((root) => real === root || real.startsWith(`${root}/`));
      if (!allowed)
        throw new HutchError(
          'VOLUME_NOT_ALLOWED',
          `volume host_path ${v.host_path} is not inside an allowed root (${this.config.volumeRoots.join(', ') || 'none configured: set HUTCH_VOLUME_ROOTS'})`,
        );
      if (seen.has(v.guest_path))
        throw new HutchError('INVALID_ARGUMENT', `two volumes mount at ${v.guest_path}`);
      seen.add(v.guest_path);
      return { ...v, host_path: real };
    });
    try {
      validateVolumes(toVmVolumes(checked));
    } catch (e) {
      throw new HutchError('INVALID_ARGUMENT', (e as Error).message);
    }
    return checked;
  }

  /** Creates a box from an image and boots it (cold: its disk is its own from the start). */
  async createBox(owner: string, req: CreateBox): Promise<BoxView> {
    const t0 = performance.now();
    if (this.closing) throw new HutchError('AGENT_UNAVAILABLE', 'the daemon is shutting down');
    const volumes = this.checkBoxRequest(req);
    if (req.name !== undefined && this.store.findByName(owner, req.name))
      throw new HutchError('NAME_TAKEN', `a box named ${JSON.stringify(req.name)} already exists`);
    if (!this.images) throw new HutchError('INTERNAL', 'this daemon has no image store');
    const image = await this.images.resolve(req.image);
    const diskBytes = req.diskSizeGb * 1024 ** 3;
    const baseBytes = statSync(image.rootfs).size;
    if (baseBytes > diskBytes)
      throw new HutchError(
        'INVALID_ARGUMENT',
        `image ${req.image} needs a disk of at least ${Math.ceil(baseBytes / 1024 ** 3)} GiB (disk_size_gb ${req.diskSizeGb})`,
      );
    const id = newBoxId();
    const spec: BoxSpec = {
      image: req.image,
      manifest: image,
      digest: image.digest,
      disk_size_gb: req.diskSizeGb,
      network: req.network,
      workdir: req.workdir ?? image.workdir ?? '/root',
      env: req.env,
      volumes,
      image_env: image.env,
    };
    const row: MachineRow = {
      id,
      owner,
      name: req.name ?? null,
      template: req.image,
      template_hash: image.hash,
      state: 'starting',
      mode: 'cold',
      accel: this.accel.accel,
      vcpus: req.cpu,
      memory_mb: req.memoryMb,
      // Boxes live until they are removed (or collected once stopped): no TTL.
      ...lifetime(true, 0),
      boot_ms: null,
      pid: null,
      run_dir: join(this.runRoot, id),
      error: null,
      jail: null,
      auto_suspend_seconds: 0,
      parent_id: null,
      kind: 'box',
      spec: JSON.stringify(spec),
      started_at: null,
      stopped_at: null,
    };
    const snap = volumes?.length ? undefined : this.boxSnapshot(image, req.cpu, req.memoryMb, diskBytes);
    if (snap) row.mode = 'snapshot';
    await this.admitUser(row, diskBytes);
    try {
      prepareRunDir(row.run_dir, this.runAs);
      const disk = join(row.run_dir, 'disk.qcow2');
      if (snap) {
        await createOverlay(snap.disk, disk, 'qcow2', this.runAs, boxSnapshotDiskBytes);
        const { live } = await this.restoreInto(row, image, snap.state, {
          memoryFrom: snap.mem,
          ignoreShared: true,
        });
        // The guest learns of a bigger disk from the resize; CONFIGURE then grows its filesystem.
        if (diskBytes > boxSnapshotDiskBytes)
          await (await this.qmpOf(id)).execute('block_resize', { device: 'root', size: diskBytes });
        if (live.agent) await this.giveIdentity(live.agent, id);
      } else {
        // The agent grows the root filesystem to the disk at boot.
        await createOverlay(image.rootfs, disk, 'raw', this.runAs, diskBytes);
        await this.bootBox(row, image);
      }
      return toBoxView(this.markRunningBox(id, t0));
    } catch (e) {
      return this.bootFailed(id, 'box', e);
    }
  }

  /**
   * The snapshot boxes of this image and size restore from, if it is ready; otherwise its
   * first creation is started (in the background, after this create) and the box boots cold.
   * Snapshots are taken with a disk of the default size: a bigger disk is a resize after the
   * restore, a smaller one needs a cold boot (a filesystem does not shrink).
   */
  private boxSnapshot(
    image: BootImage,
    cpu: number,
    memoryMb: number,
    diskBytes: number,
  ): TemplateSnapshot | undefined {
    if (diskBytes < boxSnapshotDiskBytes) return undefined;
    const manifest = { ...image, name: `box-${image.hash}-${cpu}c-${memoryMb}m` };
    const ready = this.snapshots.get(manifest.name);
    if (ready || this.snapshots.status(manifest.name) !== 'none') return ready;
    setImmediate(() => {
      // A snapshot build is a QEMU too: it waits for a later create when the caps are reached.
      if (this.closing || !this.hasRoomFor(memoryMb)) return;
      this.snapshots
        .ensure(manifest, {
          ...this.snapshotParams(manifest),
          vcpus: cpu,
          memoryMb,
          // Nothing is known to exist in an image but the agent: no warm-up commands.
          warm: [],
          diskBytes: boxSnapshotDiskBytes,
        })
        .then(
          (s) => this.log('info', 'box snapshot ready', { image: image.ref, key: s.key }),
          (e: unknown) =>
            this.log('warn', 'box snapshot failed; boxes of this image boot cold', {
              image: image.ref,
              error: (e as Error).message,
            }),
        );
    });
    return undefined;
  }

  private async bootBox(row: MachineRow, image: TemplateManifest): Promise<void> {
    const spec = boxSpecOf(row);
    const volumes = toVmVolumes(spec.volumes ?? []);
    const live = this.launch(row, image, volumes.length ? { volumes } : {});
    live.agent = await this.waitForAgent(row.id, live.pid, row.run_dir, live.console);
    if (volumes.length) await checkMounts(live.agent, spec.volumes ?? []);
  }

  private markRunningBox(id: string, t0: number): MachineRow {
    this.markRunning(id, Math.round(performance.now() - t0));
    return this.store.get(id) as MachineRow;
  }

  /** The image a box boots: the one it was created from, by digest (not whatever its tag is now). */
  private boxImage(row: MachineRow): BootImage {
    const image = boxSpecOf(row).manifest;
    if (!existsSync(image.rootfs) || !existsSync(image.kernel))
      throw new HutchError(
        'BOOT_FAILED',
        `box ${row.id}: its image ${image.ref} (${image.digest}) is no longer in the image cache`,
      );
    return image;
  }

  /**
   * Stops a box: the guest syncs its disks and powers off, so everything it wrote is kept;
   * the VM's memory and processes are gone. `start` boots it again on the same disk.
   */
  stopBox(owner: string, idOrName: string): Promise<BoxView> {
    const id = this.findBox(owner, idOrName).id;
    return this.withLock(id, async () => {
      const row = this.findBox(owner, id);
      if (row.state === 'stopped') return toBoxView(row);
      if (row.state !== 'running' && row.state !== 'paused')
        throw new HutchError('BOX_NOT_RUNNING', `box ${id} is ${row.state}`);
      this.store.update(id, { state: 'stopping' });
      const live = this.live.get(id);
      if (live) {
        try {
          if (row.state === 'paused') await (await this.qmpOf(id)).execute('cont');
          // POWEROFF syncs the guest's page cache to the disk; QEMU (-no-reboot) then exits.
          await live.agent?.poweroff();
          const deadline = Date.now() + 10_000;
          while (Date.now() < deadline && isAlive(live.pid)) await new Promise((r) => setTimeout(r, 20));
        } catch (e) {
          this.log('warn', 'box did not power off cleanly; stopping its qemu', {
            id,
            error: (e as Error).message,
          });
        }
      }
      await this.stopLive(row);
      this.execs.failAll(id, 'the box was stopped');
      this.store.update(id, { state: 'stopped', pid: null, stopped_at: new Date().toISOString() });
      this.log('info', 'box stopped', { id });
      return toBoxView(this.findBox(owner, id));
    });
  }

  /** Boots a stopped box again, on its own disk. */
  startBox(owner: string, idOrName: string): Promise<BoxView> {
    const id = this.findBox(owner, idOrName).id;
    return this.withLock(id, async () => {
      const t0 = performance.now();
      const row = this.findBox(owner, id);
      if (row.state === 'running') return toBoxView(row);
      if (row.state !== 'stopped') throw new HutchError('BOX_NOT_RUNNING', `box ${id} is ${row.state}`);
      const image = this.boxImage(row);
      await this.yieldPool(row.memory_mb);
      this.store.admitUpdate(id, { state: 'starting', error: null, mode: 'cold' }, (active) =>
        this.admit(active, row, 0),
      );
      try {
        prepareRunDir(row.run_dir, this.runAs);
        await this.bootBox(this.findBox(owner, id), image);
        return toBoxView(this.markRunningBox(id, t0));
      } catch (e) {
        const current = this.findBox(owner, id);
        await this.stopLive(current);
        this.store.update(id, { state: 'stopped', pid: null, error: (e as Error).message });
        if (e instanceof HutchError) throw e;
        throw orStorageFull(e, 'BOOT_FAILED', `box ${id} did not start: ${(e as Error).message}`);
      }
    });
  }

  /** Removes a box and its disk. A running box only with `force` (it is not stopped first). */
  async removeBox(owner: string, idOrName: string, force: boolean): Promise<void> {
    const row = this.findBox(owner, idOrName);
    if (!force && row.state !== 'stopped')
      throw new HutchError(
        'BOX_RUNNING',
        `box ${row.id} is ${row.state}: stop it first, or remove it with ?force=true`,
      );
    this.execs.failAll(row.id, 'the box was removed');
    await this.teardown(row, 'deleted');
  }

  /** Removes stopped boxes that have been stopped for at least `olderThanSeconds`. */
  async gcBoxes(owner: string, olderThanSeconds: number): Promise<{ removed: number; ids: string[] }> {
    const cutoff = Date.now() - olderThanSeconds * 1000;
    const victims = this.store
      .list(owner)
      .filter(
        (r) =>
          r.kind === 'box' &&
          r.state === 'stopped' &&
          Date.parse(r.stopped_at ?? r.created_at) <= cutoff &&
          !this.opLocks.has(r.id),
      );
    for (const r of victims) await this.teardown(r, 'deleted');
    return { removed: victims.length, ids: victims.map((r) => r.id) };
  }

  /**
   * The agent of a running machine or box. Running without one means its link is broken and
   * being retried: AGENT_UNAVAILABLE with the cause, not "not running".
   */
  private agentOf(row: MachineRow): AgentConnection {
    const agent = this.live.get(row.id)?.agent;
    const what = `${row.kind} ${row.id}`;
    // Its vCPUs are stopped until the host has space: a request would only hang.
    const paused = this.diskPauses.cause(row.id);
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

  // ---- box execs (box-execs.ts) ----

  /**
   * Starts a command in a box and returns at once; its output goes to the exec's event log
   * (replayed to every reader of /events). A program that cannot be started is EXEC_FAILED.
   */
  async startExec(owner: string, idOrName: string, req: BoxExecRequest): Promise<ExecView> {
    const box = this.findBox(owner, idOrName);
    const view = await this.execs.start(box, this.agentOf(box), req);
    this.touch(box.id);
    return view;
  }

  listExecs(owner: string, boxRef: string): ExecView[] {
    return this.execs.list(this.findBox(owner, boxRef));
  }

  getExec(owner: string, boxRef: string, execId: string): ExecView {
    return this.execs.get(this.findBox(owner, boxRef), execId);
  }

  /** Every event of an exec from the first one, then live ones until its exit event. */
  execEvents(owner: string, boxRef: string, execId: string): AsyncGenerator<ExecEvent> {
    return this.execs.events(this.findBox(owner, boxRef), execId);
  }

  /** Ends a running exec (SIGKILL to its process group); a finished one is left as it is. */
  cancelExec(owner: string, boxRef: string, execId: string): Promise<ExecView> {
    return this.execs.cancel(this.findBox(owner, boxRef), execId);
  }

  /** The agent of a running box, for streaming work (files, terminals); see openSession. */
  async openBoxSession(
    owner: string,
    idOrName: string,
  ): Promise<{ id: string; agent: AgentConnection; spec: BoxSpec; release: () => void }> {
    const box = this.findBox(owner, idOrName);
    const agent = this.agentOf(box);
    this.touch(box.id);
    return {
      id: box.id,
      agent: agent,
      spec: boxSpecOf(box),
      release: () => this.touch(box.id),
    };
  }

  /**
   * A shell on a terminal in a box (attach): a PTY exec with the box's environment and workdir.
   * The default shell falls back to /bin/sh in images without bash.
   */
  async boxTerminal(
    owner: string,
    idOrName: string,
    opts: { shell?: string; cols: number; rows: number; term: string },
  ): Promise<{ id: string; handle: ExecHandle; release: () => void }> {
    const s = await this.openBoxSession(owner, idOrName);
    const env = { ...execEnv(s.spec, undefined), TERM: opts.term };
    const start = async (shell: string): Promise<ExecHandle> => {
      const handle = s.agent.exec({
        argv: [shell],
        env,
        cwd: s.spec.workdir,
        stdin: true,
        pty: { cols: opts.cols, rows: opts.rows },
      });
      await handle.started;
      return handle;
    };
    try {
      let handle: ExecHandle;
      try {
        handle = await start(opts.shell ?? '/bin/bash');
      } catch (e) {
        if (opts.shell !== undefined || !(e instanceof AgentError) || e.code !== 'ENOENT') throw e;
        handle = await start('/bin/sh');
      }
      return { id: s.id, handle, release: s.release };
    } catch (e) {
      s.release();
      throw execError([opts.shell ?? '/bin/bash'], e);
    }
  }

  /** Ephemeral run: a box for one command, removed afterwards whatever happened. */
  async runOnce(owner: string, req: CreateBox & { cmd: string[]; timeoutMs?: number }): Promise<RunResult> {
    const box = await this.createBox(owner, { ...req, name: undefined } as CreateBox);
    try {
      const live = this.live.get(box.id);
      if (!live?.agent) throw new HutchError('BOX_NOT_RUNNING', `box ${box.id} has no agent`);
      const spec = boxSpecOf(this.findBox(owner, box.id));
      try {
        const r = await live.agent.execBuffered(
          {
            argv: req.cmd,
            env: execEnv(spec, undefined),
            cwd: spec.workdir,
            ...(req.timeoutMs ? { timeoutMs: req.timeoutMs } : {}),
          },
          { maxOutputBytes: this.config.execMaxOutputBytes, allowance: this.execOutput },
        );
        return {
          exit_code: r.exitCode,
          stdout: new HeldText(r.stdout, this.execOutput),
          stderr: new HeldText(r.stderr, this.execOutput),
          status: r.timedOut ? 'timed_out' : 'completed',
          signal: r.signal,
          error_message: r.timedOut
            ? `killed after its timeout of ${req.timeoutMs} ms`
            : r.signal !== null
              ? `killed by signal ${r.signal}`
              : r.truncated
                ? `output was cut: over ${this.config.execMaxOutputBytes} bytes, or the server's buffer for all runs at once (${this.config.execBufferBytes} bytes) was full`
                : null,
        };
      } catch (e) {
        const err = execError(req.cmd, e);
        return {
          exit_code: null,
          stdout: new HeldText(),
          stderr: new HeldText(),
          error_message: err.message,
          status: 'failed',
          signal: null,
        };
      }
    } finally {
      const row = this.store.get(box.id);
      if (row) await this.teardown(row, 'deleted');
    }
  }

  // ---- warm pool ----------------------------------------------------------------------------

  private readonly pool = new Map<string, Pooled[]>();
  /** The refill under way, if any (close() waits for it, so no half-made pool machine is left). */
  private refilling: Promise<void> | undefined;

  /** The pool's state per template, for /healthz. */
  poolStatus(): Record<string, { ready: number; target: number }> {
    const out: Record<string, { ready: number; target: number }> = {};
    for (const name of this.templates.keys())
      out[name] = { ready: this.pool.get(name)?.length ?? 0, target: this.config.poolSize };
    return out;
  }

  /** Removes and returns a pooled machine: once taken it is in no list, so it is never served twice. */
  private takePooled(template: string): Pooled | undefined {
    return this.pool.get(template)?.shift();
  }

  /** Turns a pooled machine into the caller's: admit it, continue it, give it its identity. */
  private async handOut(owner: string, req: CreateMachine, pooled: Pooled, t0: number): Promise<MachineView> {
    const persistent = req.persistent === true && this.config.allowPersistent;
    const ttl = clampTtl(req.ttlSeconds);
    const row: MachineRow = {
      ...pooled.row,
      owner,
      name: req.name ?? null,
      state: 'starting',
      mode: 'pool',
      ...lifetime(persistent, ttl),
      pid: pooled.live.pid,
      auto_suspend_seconds: req.autoSuspendSeconds ?? null,
    };
    try {
      this.insertRow(row, this.diskBytesOf(row));
    } catch (e) {
      await this.discardPooled(pooled);
      throw e;
    }
    this.live.set(row.id, pooled.live);
    try {
      const qmp = await this.qmpOf(row.id);
      await qmp.execute('cont');
      if (!pooled.live.agent) throw new Error('pooled machine lost its agent');
      await this.giveIdentity(pooled.live.agent, row.id);
      return this.markRunning(row.id, Math.round(performance.now() - t0));
    } catch (e) {
      const current = this.store.get(row.id);
      if (current) await this.teardown(current, 'deleted');
      throw new HutchError('BOOT_FAILED', `pooled machine did not start: ${(e as Error).message}`);
    } finally {
      // After the hand-out, not before: the refill's restore must not delay this create.
      setImmediate(() => this.background('pool refill', {}, () => this.schedulePoolRefill()));
    }
  }

  /**
   * Room for one more pooled machine: the pool never takes what users could have (their caps
   * count it), and it stops growing when the host runs short of memory.
   */
  private poolHasRoom(manifest: TemplateManifest): boolean {
    if (this.usersWaiting > 0 || !this.hasRoomFor(this.config.machineMemoryMb)) return false;
    if (hostMemAvailableMb() <= this.config.machineMemoryMb + 1024) return false;
    try {
      checkDiskRoom(this.diskRoom(), statSync(manifest.rootfs).size, 'a pooled machine');
      return true;
    } catch {
      return false;
    }
  }

  /** Whether one more QEMU of `memoryMb` fits under the caps, counting every QEMU we run. */
  private hasRoomFor(memoryMb: number): boolean {
    return this.overCaps(this.store.activeRows(), memoryMb) === undefined;
  }

  schedulePoolRefill(): void {
    if (this.refilling || this.closing || this.config.poolSize === 0) return;
    this.refilling = this.refillPool().finally(() => {
      this.refilling = undefined;
    });
  }

  private async refillPool(): Promise<void> {
    for (const manifest of this.templates.values()) {
      const snap = this.snapshots.get(manifest.name);
      if (!snap) continue;
      const list = this.pool.get(manifest.name) ?? [];
      this.pool.set(manifest.name, list);
      while (list.length < this.config.poolSize && !this.closing && this.poolHasRoom(manifest)) {
        this.poolMaking++;
        try {
          list.push(await this.makePooled(manifest, snap));
        } catch (e) {
          this.log('warn', 'pool refill failed', { template: manifest.name, error: (e as Error).message });
          return;
        } finally {
          this.poolMaking--;
        }
      }
    }
  }

  /**
   * Restores a machine from the template snapshot and runs one command in it before parking it
   * paused: under TCG a fresh restore spends ~140 ms re-translating guest code on its first
   * command, which the user of a pooled machine should not pay.
   */
  private async makePooled(manifest: TemplateManifest, snap: TemplateSnapshot): Promise<Pooled> {
    const id = newMachineId();
    const row: MachineRow = {
      id,
      owner: '',
      name: null,
      template: manifest.name,
      template_hash: manifest.hash,
      state: 'starting',
      mode: 'pool',
      accel: this.accel.accel,
      vcpus: this.config.machineVcpus,
      memory_mb: this.config.machineMemoryMb,
      persistent: 0,
      ttl_seconds: null,
      created_at: new Date().toISOString(),
      expires_at: null,
      boot_ms: null,
      pid: null,
      run_dir: join(this.runRoot, id),
      error: null,
      jail: null,
      auto_suspend_seconds: null,
      parent_id: null,
      kind: 'machine',
      spec: null,
      started_at: null,
      stopped_at: null,
    };
    prepareRunDir(row.run_dir, this.runAs);
    await createOverlay(snap.disk, join(row.run_dir, 'disk.qcow2'), 'qcow2', this.runAs);
    try {
      const { live } = await this.restoreInto(row, manifest, snap.state, {
        memoryFrom: snap.mem,
        ignoreShared: true,
      });
      // Warm both paths a hand-out takes: an exec, and the identity step (overwritten then).
      await live.agent?.execCollect({ argv: ['true'] }, { maxOutputBytes: 1024 });
      if (live.agent) await this.giveIdentity(live.agent, id);
      await (await this.qmpOf(id)).execute('stop');
      row.jail = JSON.stringify(live.jail ?? null);
      this.live.delete(id);
      return { row, live };
    } catch (e) {
      const live = this.live.get(id);
      this.live.delete(id);
      if (live) await this.discardPooled({ row, live });
      else rmSync(row.run_dir, { recursive: true, force: true });
      throw e;
    }
  }

  private async discardPooled(p: Pooled): Promise<void> {
    await this.release(p.row.id, p.row.run_dir, p.live, null);
    rmSync(p.row.run_dir, { recursive: true, force: true });
  }

  /** Gives back pooled machines when the host runs short of memory. */
  private shrinkPoolUnderPressure(): void {
    if (hostMemAvailableMb() > this.config.machineMemoryMb + 512) return;
    for (const list of this.pool.values()) {
      const p = list.pop();
      if (p) {
        this.log('warn', 'memory pressure: shrinking the warm pool', { id: p.row.id });
        this.background('pool discard', { id: p.row.id }, () => this.discardPooled(p));
        return;
      }
    }
  }

  // ---- branch -------------------------------------------------------------------------------

  /**
   * Forks a running (or paused) machine into a live clone: same memory, processes and files,
   * its own id, TTL and disk from then on. The source is stopped only while its state is
   * written and its disk copied, then continues with everything it had; its open execs go on.
   *
   * Disk: the clone gets a copy of the source's own overlay (what the source wrote since it
   * started), on the same read-only image below. A copy, not a shared frozen layer: every
   * machine owns its whole writable disk, so deleting a parent can never break a child. The
   * copy is a reflink where the filesystem can (O(1)), else proportional to what was written.
   */
  async branch(
    owner: string,
    idOrName: string,
    req: { name?: string; ttlSeconds?: number },
  ): Promise<MachineView & { pause_ms: number }> {
    const t0 = performance.now();
    const source = this.find(owner, idOrName);
    const manifest = this.templates.get(source.template);
    if (!manifest) throw new HutchError('TEMPLATE_NOT_READY', `template ${source.template} is not loaded`);
    if (source.state !== 'running' && source.state !== 'paused') throw this.notRunning(source, 'branch');
    if (req.name !== undefined && this.store.findByName(owner, req.name))
      throw new HutchError('NAME_TAKEN', `a machine named ${JSON.stringify(req.name)} already exists`);
    const id = newMachineId();
    const ttl = clampTtl(req.ttlSeconds ?? source.ttl_seconds ?? undefined);
    const persistent = req.ttlSeconds === undefined && source.persistent === 1;
    const row: MachineRow = {
      ...source,
      id,
      name: req.name ?? null,
      state: 'starting',
      mode: 'branch',
      ...lifetime(persistent, ttl),
      boot_ms: null,
      pid: null,
      run_dir: join(this.runRoot, id),
      error: null,
      jail: null,
      parent_id: source.id,
    };
    await this.admitUser(row, this.diskBytesOf(row));
    const stateFile = join(row.run_dir, 'branch.state');
    let pauseMs = 0;
    let saved: MachineSaved | undefined;
    let diskMs = 0;
    try {
      prepareRunDir(row.run_dir, this.runAs);
      await this.withLock(source.id, async () => {
        const src = this.find(owner, source.id);
        if (src.state !== 'running' && src.state !== 'paused') throw this.notRunning(src, 'branch');
        const qmp = await this.qmpOf(src.id);
        const wasRunning = src.state === 'running';
        const p0 = performance.now();
        if (wasRunning) await qmp.execute('stop');
        try {
          // Device state plus a copy of the source's RAM file, which becomes the clone's own.
          saved = await saveMachine(qmp, runPaths(src.run_dir).migDir, {
            state: stateFile,
            memory: this.memoryCopy(src.id, this.memoryOf(id), { chargeTo: this.chargeTo(row) }),
            maxBytesPerSecond: this.config.migrationMaxMBps * 1e6,
            durable: false,
          });
          // A completed migration has flushed the source's disk, so the copy is consistent.
          const d0 = performance.now();
          const disk = join(row.run_dir, 'disk.qcow2');
          copyFileSync(join(src.run_dir, 'disk.qcow2'), disk, constants.COPYFILE_FICLONE);
          if (this.runAs) chownSync(disk, this.runAs.uid, this.runAs.gid);
          diskMs = performance.now() - d0;
        } finally {
          if (wasRunning) await qmp.execute('cont');
          pauseMs = performance.now() - p0;
          this.touch(src.id);
        }
      });
      const r0 = performance.now();
      const { live, restoredUs, agentUs } = await this.restoreInto(
        this.find(owner, id),
        manifest,
        stateFile,
        {
          ignoreShared: saved?.ignoreShared ?? false,
        },
      );
      const r1 = performance.now();
      if (live.agent) await this.giveIdentity(live.agent, id);
      rmSync(stateFile, { force: true });
      this.log('info', 'machine branched', {
        id,
        source: source.id,
        ...branchTimings({ t0, r0, r1, pauseMs, diskMs, restoredUs, agentUs, saved }),
        identity_ms: Math.round((performance.now() - r1) * 10) / 10,
      });
      const view = this.markRunning(id, Math.round(performance.now() - t0));
      return { ...view, pause_ms: Math.round(pauseMs * 10) / 10 };
    } catch (e) {
      const current = this.store.get(id);
      if (current) await this.teardown(current, 'deleted');
      if (e instanceof HutchError) throw e;
      throw orStorageFull(e, 'BOOT_FAILED', `branch of ${source.id} failed: ${(e as Error).message}`);
    }
  }

  /** What a save copies of `id`'s RAM: its own file, unless an older daemon started it without. */
  private memoryCopy(id: string, to: string, copy: CopyOptions = {}): MachineSave['memory'] {
    const from = this.memoryOf(id);
    return existsSync(from) ? { from, to, copy: { owner: this.runAs, ...copy } } : undefined;
  }

  private insertRow(row: MachineRow, diskBytes: number): void {
    try {
      this.store.insertMachine(row, (active) => this.admit(active, row, diskBytes));
    } catch (e) {
      if (e instanceof HutchError) throw e;
      if (/UNIQUE/.test((e as Error).message))
        throw new HutchError('NAME_TAKEN', `a machine named ${JSON.stringify(row.name)} already exists`);
      throw e;
    }
  }

  // ---- pause, resume, suspend -------------------------------------------------------------

  private readonly opLocks = new Map<string, Promise<unknown>>();
  private readonly lastActive = new Map<string, number>();

  private touch(id: string): void {
    this.lastActive.set(id, Date.now());
  }

  /** Runs lifecycle operations on one machine one at a time. */
  private withLock<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.opLocks.get(id) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const settled = next.catch(() => {});
    this.opLocks.set(id, settled);
    void settled.then(() => {
      if (this.opLocks.get(id) === settled) this.opLocks.delete(id);
    });
    return next;
  }

  /** Stops the vCPUs; memory and everything else stays. */
  pause(owner: string, idOrName: string): Promise<MachineView & { pause_us: number }> {
    const id = this.find(owner, idOrName).id;
    return this.withLock(id, async () => {
      const row = this.find(owner, id);
      if (row.state === 'paused') return { ...this.view(row), pause_us: 0 };
      if (row.state !== 'running') throw this.notRunning(row, 'pause');
      const qmp = await this.qmpOf(id);
      const t0 = performance.now();
      await qmp.execute('stop');
      const us = Math.round((performance.now() - t0) * 1000);
      this.store.update(id, { state: 'paused' });
      return { ...this.view(this.find(owner, id)), pause_us: us };
    });
  }

  /** Continues a paused machine, or brings a suspended one back from disk. */
  resume(owner: string, idOrName: string): Promise<MachineView & { resume_us: number }> {
    const id = this.find(owner, idOrName).id;
    return this.withLock(id, async () => {
      const row = this.find(owner, id);
      if (row.state === 'running') return { ...this.view(row), resume_us: 0 };
      if (row.state === 'paused') {
        const qmp = await this.qmpOf(id);
        const t0 = performance.now();
        await qmp.execute('cont');
        const us = Math.round((performance.now() - t0) * 1000);
        const live = this.live.get(id);
        if (live && !live.agent) {
          // Adopted while paused: the agent can answer only now.
          live.agent = await connectAgent(runPaths(row.run_dir).agent, { timeoutMs: 10_000 });
          this.watchAgent(id, live.agent);
        }
        this.store.update(id, { state: 'running' });
        this.touch(id);
        return { ...this.view(this.find(owner, id)), resume_us: us };
      }
      if (row.state === 'suspended') {
        const us = await this.resumeFromDisk(row);
        this.touch(id);
        return { ...this.view(this.find(owner, id)), resume_us: us };
      }
      throw this.notRunning(row, 'resume');
    });
  }

  /**
   * Writes the whole machine (RAM, devices; the disk is already a file) to its run dir and ends
   * its QEMU, freeing the memory. Open execs end with a clear error; files and background
   * processes come back on resume.
   */
  suspend(owner: string, idOrName: string): Promise<MachineView & { suspend_us: number }> {
    const id = this.find(owner, idOrName).id;
    return this.withLock(id, async () => {
      const row = this.find(owner, id);
      if (row.state === 'suspended') return { ...this.view(row), suspend_us: 0 };
      if (row.state !== 'running' && row.state !== 'paused') throw this.notRunning(row, 'suspend');
      const live = this.live.get(id);
      if (!live) throw this.notRunning(row, 'suspend');
      const t0 = performance.now();
      const stateFile = join(row.run_dir, 'suspend.state');
      const memoryFile = join(row.run_dir, 'suspend.ram');
      const qmp = await this.qmpOf(id);
      this.store.update(id, { state: 'suspending' });
      try {
        // The agent sees the host leave and ends the open exec streams before the freeze, so
        // the machine resumes with no half-finished stream.
        live.agent?.close();
        live.agent = undefined;
        await new Promise((r) => setTimeout(r, 50));
        await qmp.execute('stop');
        const bytesPerSecond = this.config.migrationMaxMBps * 1e6;
        await saveMachine(qmp, runPaths(row.run_dir).migDir, {
          state: stateFile,
          memory: this.memoryCopy(id, memoryFile, {
            durable: true,
            bytesPerSecond,
            stillWanted: () => isAlive(live.pid),
          }),
          maxBytesPerSecond: bytesPerSecond,
          durable: true,
        });
      } catch (e) {
        rmSync(stateFile, { force: true });
        removeMemoryFile(memoryFile);
        if (!isAlive(live.pid)) {
          await this.teardown(this.find(owner, id), 'failed', 'qemu exited during suspend');
          throw new HutchError('MACHINE_NOT_RUNNING', `suspend of ${id} failed: qemu exited during suspend`);
        }
        // The source keeps running with everything it had: a failed suspend changes nothing.
        await qmp.execute('cont').catch(() => {});
        live.agent = await connectAgent(runPaths(row.run_dir).agent, { timeoutMs: 10_000 }).catch(
          () => undefined,
        );
        if (live.agent) this.watchAgent(id, live.agent);
        this.store.update(id, { state: 'running' });
        throw orStorageFull(
          e,
          'INTERNAL',
          `suspend of ${id} failed, machine left running: ${(e as Error).message}`,
        );
      }
      this.store.update(id, { state: 'suspended', pid: null });
      await this.stopLive(row);
      const us = Math.round((performance.now() - t0) * 1000);
      this.log('info', 'machine suspended', { id, suspend_us: us });
      return { ...this.view(this.find(owner, id)), suspend_us: us };
    });
  }

  private async resumeFromDisk(row: MachineRow): Promise<number> {
    const stateFile = join(row.run_dir, 'suspend.state');
    const manifest = this.templates.get(row.template);
    if (!manifest || !existsSync(stateFile))
      throw new HutchError(
        'MACHINE_NOT_RUNNING',
        `machine ${row.id} cannot be resumed: its saved state is gone`,
      );
    this.store.update(row.id, { state: 'resuming' });
    // Saved since machines have RAM files of their own; without it, RAM is in the state stream.
    const memoryFile = join(row.run_dir, 'suspend.ram');
    const withMemory = existsSync(memoryFile);
    try {
      prepareRunDir(row.run_dir, this.runAs);
      const { live, restoredUs } = await this.restoreInto(row, manifest, stateFile, {
        ...(withMemory ? { memoryFrom: memoryFile } : {}),
        ignoreShared: withMemory,
      });
      // The guest clock stood still while the machine was on disk.
      await live.agent?.configure({ timeNs: BigInt(Date.now()) * 1_000_000n }, 10_000);
      if (live.agent) this.watchAgent(row.id, live.agent);
      this.store.update(row.id, { state: 'running' });
      rmSync(stateFile, { force: true });
      removeMemoryFile(memoryFile);
      this.log('info', 'machine resumed', { id: row.id, resume_us: restoredUs });
      return restoredUs;
    } catch (e) {
      // Back to suspended, state file untouched: the machine can be resumed again.
      await this.stopLive(row);
      this.store.update(row.id, { state: 'suspended', pid: null });
      throw new HutchError(
        'INTERNAL',
        `resume of ${row.id} failed (still suspended): ${(e as Error).message}`,
      );
    }
  }

  /** Ends a machine's QEMU and connections but keeps its run dir and row (suspend, failed resume). */
  private async stopLive(row: MachineRow): Promise<void> {
    const live = this.live.get(row.id);
    if (!live) return;
    if (live.ttl) this.orphanTimers.set(row.id, live.ttl);
    this.live.delete(row.id);
    await this.release(row.id, row.run_dir, live, null);
  }

  /**
   * Ends what a machine holds on the host besides its run dir: connections, console tap, its
   * QEMU (if that pid is still this machine's) and its cgroup. Shared by destroy, suspend, a
   * failed resume and a discarded pool machine.
   */
  private async release(
    id: string,
    runDir: string,
    live: Live | undefined,
    pid: number | null,
  ): Promise<void> {
    live?.agent?.close();
    live?.qmp?.close();
    live?.console.stop();
    const qemu = live?.pid ?? pid;
    if (qemu !== null && isQemuOf(qemu, id)) await stopQemu(qemu, runPaths(runDir).qmp);
    // Before the cgroup: its pages are charged there, and a memcg with charges lingers.
    removeMemoryFile(this.memoryOf(id));
    if (!(await releaseCgroup(id))) this.log('warn', 'cgroup not removed yet', { id });
  }

  /** Idle: no request touched the machine for its auto-suspend timeout (0 = never). */
  private idleSuspendDue(row: MachineRow): boolean {
    const timeout = row.auto_suspend_seconds ?? this.config.autoSuspendSeconds;
    if (!timeout || this.opLocks.has(row.id) || this.sessions.has(row.id)) return false;
    const last = this.lastActive.get(row.id) ?? Date.parse(row.created_at);
    return Date.now() - last >= timeout * 1000;
  }

  /** Sets the machine's idle auto-suspend timeout (0 disables it; null: the server default). */
  setAutoSuspend(owner: string, idOrName: string, seconds: number | null): MachineView {
    const row = this.find(owner, idOrName);
    this.store.update(row.id, { auto_suspend_seconds: seconds });
    this.touch(row.id);
    return this.view(this.find(owner, row.id));
  }

  private notRunning(row: MachineRow, op: string): HutchError {
    return new HutchError(
      'MACHINE_NOT_RUNNING',
      `cannot ${op} machine ${row.id}: it is ${row.state}${row.error ? ` (${row.error})` : ''}`,
    );
  }

  /**
   * Stops the engine. Machines keep running: a restarted daemon adopts them. (Their TTLs are
   * enforced again as soon as it is back.)
   */
  async close(): Promise<void> {
    this.closing = true;
    if (this.sweeper) clearInterval(this.sweeper);
    // Pooled machines belong to no one: they go with the daemon (a restart would kill them anyway).
    await this.refilling;
    // A snapshot being taken has a QEMU of its own: let it finish rather than orphan it.
    await this.snapshots.settle();
    for (const list of this.pool.values())
      await Promise.all(list.splice(0).map((p) => this.discardPooled(p)));
    await Promise.allSettled([...this.teardowns.values()]);
    for (const live of this.live.values()) {
      if (live.ttl) clearTimeout(live.ttl);
      live.agent?.close();
      live.qmp?.close();
      live.console.stop();
    }
    for (const t of this.orphanTimers.values()) clearTimeout(t);
    this.live.clear();
    this.store.close();
  }
}

/** The lifetime fields of a machine starting now: a TTL, or none when persistent. */
function lifetime(
  persistent: boolean,
  ttl: number,
): Pick<MachineRow, 'persistent' | 'ttl_seconds' | 'created_at' | 'expires_at'> {
  const now = Date.now();
  return {
    persistent: persistent ? 1 : 0,
    ttl_seconds: persistent ? null : ttl,
    created_at: new Date(now).toISOString(),
    expires_at: persistent ? null : new Date(now + ttl * 1000).toISOString(),
  };
}

export function clampTtl(ttl: number | undefined): number {
  if (ttl === undefined) return ttlBounds.default;
  return Math.min(ttlBounds.max, Math.max(ttlBounds.min, Math.round(ttl)));
}

/** Box ids have an underscore, which a hostname may not (CONFIGURE checks [A-Za-z0-9.-]). */
function hostnameOf(id: string): string {
  return id.replace(/_/g, '-');
}

/** A box's volumes as the VM sees them: 9p tags vol0, vol1, … */
function toVmVolumes(volumes: BoxVolume[]): Volume[] {
  return volumes.map((v, i) => ({
    tag: `vol${i}`,
    hostPath: v.host_path,
    guestPath: v.guest_path,
    readonly: v.readonly,
  }));
}

/**
 * The agent mounts volumes at boot and only logs a failure (a boot must not hang on one): a
 * box is not handed out with a volume silently missing. The usual cause is a host directory
 * the unprivileged QEMU user cannot open.
 */
async function checkMounts(agent: AgentConnection, volumes: BoxVolume[]): Promise<void> {
  const h = agent.readFile('/proc/self/mounts');
  const chunks: Buffer[] = [];
  for await (const c of h.stream) chunks.push(c as Buffer);
  await h.done;
  const mounted = new Set(
    Buffer.concat(chunks)
      .toString('utf8')
      .split('\n')
      .map((l) => l.split(' '))
      .filter((f) => f[2] === '9p')
      .map((f) =>
        (f[1] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8))),
      ),
  );
  for (const v of volumes)
    if (!mounted.has(v.guest_path))
      throw new HutchError(
        'BOOT_FAILED',
        `volume ${v.host_path} could not be mounted at ${v.guest_path}: the VM user must be able to read (and for a writable volume, write) it`,
      );
}

function lookupUser(name: string): { user: string; uid: number; gid: number } | undefined {
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

/** MemAvailable from /proc/meminfo, MiB. */
function hostMemAvailableMb(): number {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(safeRead('/proc/meminfo'));
  return m?.[1] ? Number(m[1]) / 1024 : Number.POSITIVE_INFINITY;
}

function safeRead(path: string): string {
  try {
    return existsSync(path) ? readFileSync(path, 'utf8') : '';
  } catch {
    return '';
  }
}
