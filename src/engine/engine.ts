import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config.js';
import { HutchError } from '../errors.js';
import { type AgentConnection, AgentError, connectAgent } from '../guest/agent-connection.js';
import type { TemplateManifest } from '../images/builder.js';
import { templateRecipes } from '../images/recipes.js';
import type { AccelChoice } from '../vmm/accel.js';
import { cgroupSupport, confine, listMachineCgroups, releaseCgroup } from '../vmm/cgroup.js';
import { ConsoleTap } from '../vmm/console.js';
import { createOverlay } from '../vmm/disk.js';
import { tcgTimingArgs } from '../vmm/host.js';
import {
  isAlive,
  isQemuOf,
  killAndWait,
  launchQemu,
  listHutchQemus,
  runPaths,
  stopQemu,
} from '../vmm/qemu.js';
import { newMachineId } from './ids.js';
import { type MachineView, toView } from './machine-view.js';
import { type MachineRow, Store } from './store.js';

export const ttlBounds = { min: 15, max: 900, default: 60 } as const;

export interface CreateMachine {
  template: string;
  ttlSeconds?: number;
  persistent?: boolean;
  name?: string;
  net?: boolean;
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
  stdout: string;
  stderr: string;
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
  guest_memory_mb: { used: number; cap: number };
  max_machines: number;
  uptime_s: number;
}

/** What the engine holds for a live machine beyond its row: connections and timers. */
interface Live {
  agent?: AgentConnection;
  console: ConsoleTap;
  ttl?: NodeJS.Timeout;
  pid: number;
}

type Log = (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

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
  private readonly qemuUser: string | undefined;
  private readonly cgroups = cgroupSupport();
  private closing = false;

  constructor(
    private readonly config: Config,
    private readonly templates: Map<string, TemplateManifest>,
    private readonly accel: AccelChoice,
    private readonly log: Log,
  ) {
    mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
    this.runRoot = join(config.stateDir, 'run');
    mkdirSync(this.runRoot, { recursive: true, mode: 0o700 });
    this.store = new Store(join(config.stateDir, 'hutch.db'));
    this.qemuUser = userExists(config.qemuUser) ? config.qemuUser : undefined;
  }

  /** Re-adopts machines left by a previous daemon, cleans what is dead, starts the sweeper. */
  async start(): Promise<void> {
    const known = new Set<string>();
    for (const row of this.store.list()) {
      known.add(row.id);
      await this.recover(row);
    }
    // QEMU processes of ours that the store does not know: a crash between launch and insert.
    for (const q of listHutchQemus()) {
      if (!q.argv.some((a) => a.includes(this.runRoot))) continue;
      const row = this.store.get(q.id);
      if (!row || (row.state !== 'running' && row.state !== 'starting')) {
        this.log('warn', 'killing orphan qemu', { pid: q.pid, id: q.id });
        await killAndWait(q.pid);
      }
    }
    for (const dir of readdirSync(this.runRoot)) {
      if (!this.store.get(dir)) rmSync(join(this.runRoot, dir), { recursive: true, force: true });
    }
    // cgroups are named by machine id, which is unique across daemons: one with no live QEMU
    // and no running row anywhere here is debris from a crash.
    const liveIds = new Set(listHutchQemus().map((q) => q.id));
    for (const name of listMachineCgroups()) {
      if (!liveIds.has(name)) await releaseCgroup(name, 100);
    }
    this.sweeper = setInterval(() => this.sweep(), 500);
    this.sweeper.unref();
  }

  private async recover(row: MachineRow): Promise<void> {
    const alive = row.pid !== null && isQemuOf(row.pid, row.id);
    if (row.state === 'running' && alive && row.pid !== null) {
      const console = new ConsoleTap(runPaths(row.run_dir).console, join(row.run_dir, 'console.log'));
      console.start();
      const live: Live = { console, pid: row.pid };
      this.live.set(row.id, live);
      try {
        live.agent = await connectAgent(runPaths(row.run_dir).agent, { timeoutMs: 10_000 });
        this.watchAgent(row.id, live.agent);
        this.armTtl(row);
        this.log('info', 'adopted running machine', { id: row.id, pid: row.pid });
        return;
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
        return;
      }
    }
    if (row.state === 'failed') {
      this.armTtl(row);
      return;
    }
    // starting (daemon died mid-create), destroying (mid-destroy), or running but QEMU is gone.
    if (row.state === 'running') {
      await this.teardown(row, 'failed', 'qemu exited while the daemon was down');
    } else {
      await this.teardown(row, 'deleted');
    }
  }

  health(): Health {
    const rows = this.store.list();
    const active = rows.filter((r) => r.state === 'running' || r.state === 'starting');
    const templates: Record<string, 'ready' | 'not built'> = {};
    for (const name of Object.keys(templateRecipes))
      templates[name] = this.templates.has(name) ? 'ready' : 'not built';
    return {
      status: 'ok',
      running: rows.filter((r) => r.state === 'running').length,
      machines: rows.length,
      accel: this.accel.accel,
      accel_reason: this.accel.reason,
      templates,
      guest_memory_mb: {
        used: active.reduce((s, r) => s + r.memory_mb, 0),
        cap: this.config.maxGuestMemoryMb,
      },
      max_machines: this.config.maxMachines,
      uptime_s: Math.round((Date.now() - this.startedAt) / 1000),
    };
  }

  list(owner: string): MachineView[] {
    return this.store.list(owner).map(toView);
  }

  get(owner: string, idOrName: string): MachineView {
    return toView(this.find(owner, idOrName));
  }

  private find(owner: string, idOrName: string): MachineRow {
    const row = this.store.get(idOrName) ?? this.store.findByName(owner, idOrName);
    if (!row || row.owner !== owner)
      throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(idOrName)}`);
    return row;
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

    const persistent = req.persistent === true && this.config.allowPersistent;
    const ttl = clampTtl(req.ttlSeconds);
    const id = newMachineId();
    const now = new Date();
    const runDir = join(this.runRoot, id);
    const row: MachineRow = {
      id,
      owner,
      name: req.name ?? null,
      template: req.template,
      template_hash: manifest.hash,
      state: 'starting',
      mode: 'cold',
      accel: this.accel.accel,
      vcpus: this.config.machineVcpus,
      memory_mb: this.config.machineMemoryMb,
      persistent: persistent ? 1 : 0,
      ttl_seconds: persistent ? null : ttl,
      created_at: now.toISOString(),
      expires_at: persistent ? null : new Date(now.getTime() + ttl * 1000).toISOString(),
      boot_ms: null,
      pid: null,
      run_dir: runDir,
      error: null,
      jail: null,
    };
    try {
      this.store.insertMachine(row, (active) => this.admit(active, row));
    } catch (e) {
      if (e instanceof HutchError) throw e;
      if (/UNIQUE/.test((e as Error).message))
        throw new HutchError('NAME_TAKEN', `a machine named ${JSON.stringify(req.name)} already exists`);
      throw e;
    }

    let console: ConsoleTap | undefined;
    try {
      mkdirSync(runDir, { recursive: true, mode: 0o700 });
      createOverlay(manifest.rootfs, join(runDir, 'disk.qcow2'));
      const cmdline = [
        manifest.cmdline,
        `hutch.hostname=${id}`,
        this.accel.accel === 'tcg' ? tcgTimingArgs(manifest.kernelHz) : '',
      ]
        .filter(Boolean)
        .join(' ');
      const spec = {
        id,
        accel: this.accel.accel,
        vcpus: row.vcpus,
        memoryMb: row.memory_mb,
        kernel: manifest.kernel,
        disk: join(runDir, 'disk.qcow2'),
        cmdline,
        runDir,
        ...(this.qemuUser ? { runAs: this.qemuUser } : {}),
      };
      const pid = launchQemu(this.config.qemuBinary, spec);
      const jail = { seccomp: true, user: this.qemuUser ?? null, cgroup: null as string | null };
      if (this.cgroups !== 'none') {
        try {
          // Guest RAM plus room for QEMU itself and the TCG translation cache.
          const handle = confine(id, pid, {
            memoryBytes: (row.memory_mb + 192) * 1024 * 1024,
            cpus: row.vcpus,
            pids: 256,
          });
          jail.cgroup = handle.kind;
        } catch (e) {
          this.log('warn', 'cgroup confinement failed', { id, error: (e as Error).message });
        }
      }
      this.store.update(id, { pid, jail: JSON.stringify(jail) });
      console = new ConsoleTap(runPaths(runDir).console, join(runDir, 'console.log'));
      console.start();
      const live: Live = { console, pid };
      this.live.set(id, live);
      live.agent = await this.waitForAgent(id, pid, runDir, console);
      const bootMs = Math.round(performance.now() - t0);
      this.store.update(id, { state: 'running', boot_ms: bootMs });
      this.watchAgent(id, live.agent);
      const final = this.store.get(id);
      if (!final) throw new Error('machine vanished during create');
      this.armTtl(final);
      this.log('info', 'machine created', { id, boot_ms: bootMs });
      return toView(final);
    } catch (e) {
      const tail = console?.recent().toString('utf8').slice(-1500) ?? '';
      const current = this.store.get(id);
      if (current) await this.teardown(current, 'deleted');
      if (e instanceof HutchError) throw e;
      throw new HutchError('BOOT_FAILED', `machine did not boot: ${(e as Error).message}`, {
        console_tail: tail,
      });
    }
  }

  private admit(active: MachineRow[], row: MachineRow): void {
    if (active.length + 1 > this.config.maxMachines)
      throw new HutchError(
        'RESOURCE_EXHAUSTED',
        `at most ${this.config.maxMachines} machines may run at once (${active.length} running)`,
      );
    const used = active.reduce((s, r) => s + r.memory_mb, 0);
    if (used + row.memory_mb > this.config.maxGuestMemoryMb)
      throw new HutchError(
        'RESOURCE_EXHAUSTED',
        `guest memory cap reached: ${used} MiB in use + ${row.memory_mb} MiB requested > ${this.config.maxGuestMemoryMb} MiB`,
      );
  }

  /** Connects to the agent, failing fast (with the console's last words) if QEMU dies first. */
  private async waitForAgent(
    id: string,
    pid: number,
    runDir: string,
    console: ConsoleTap,
  ): Promise<AgentConnection> {
    const abort = new AbortController();
    const deadline = this.config.bootTimeoutMs;
    const died = new Promise<never>((_, reject) => {
      const t = setInterval(() => {
        if (abort.signal.aborted) return clearInterval(t);
        if (!isAlive(pid)) {
          clearInterval(t);
          const log = safeRead(runPaths(runDir).qemuLog).trim().split('\n').slice(-3).join(' | ');
          reject(
            new Error(
              `qemu exited during boot${log ? `: ${log}` : ''}; console: ${console.recent().toString('utf8').slice(-300)}`,
            ),
          );
        }
      }, 25);
    });
    try {
      return await Promise.race([
        connectAgent(runPaths(runDir).agent, { timeoutMs: deadline, signal: abort.signal }),
        died,
      ]);
    } catch (e) {
      // A dead QEMU also breaks the agent socket; the exit is the more useful report.
      await new Promise((r) => setTimeout(r, 30));
      if (!isAlive(pid)) {
        const log = safeRead(runPaths(runDir).qemuLog).trim().split('\n').slice(-3).join(' | ');
        throw new Error(`qemu exited during boot${log ? ` (${log})` : ''}`);
      }
      throw new Error(`${id}: ${(e as Error).message}`);
    } finally {
      abort.abort();
      died.catch(() => {});
    }
  }

  private watchAgent(id: string, agent: AgentConnection): void {
    void agent.closed.then(async (err: Error | undefined) => {
      const row = this.store.get(id);
      const live = this.live.get(id);
      if (row?.state !== 'running' || !live || live.agent !== agent) return;
      // The agent connection drops when QEMU dies; tell the two apart.
      await new Promise((r) => setTimeout(r, 50));
      if (!isAlive(live.pid)) {
        await this.teardown(row, 'failed', `qemu exited unexpectedly${err ? ` (${err.message})` : ''}`);
      } else {
        this.log('warn', 'agent connection lost; reconnecting', { id, error: err?.message });
        try {
          live.agent = await connectAgent(runPaths(row.run_dir).agent, { timeoutMs: 10_000 });
          this.watchAgent(id, live.agent);
        } catch (e) {
          await this.teardown(row, 'failed', `agent stopped answering: ${(e as Error).message}`);
        }
      }
    });
  }

  private armTtl(row: MachineRow): void {
    const live = this.live.get(row.id);
    if (!row.expires_at) return;
    const ms = Math.max(0, new Date(row.expires_at).getTime() - Date.now());
    const timer = setTimeout(() => {
      void this.expire(row.id);
    }, ms);
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
    for (const row of this.store.list()) {
      if (row.expires_at && new Date(row.expires_at).getTime() <= Date.now() && row.state !== 'destroying') {
        void this.expire(row.id);
      } else if (row.state === 'running' && row.pid !== null && !isAlive(row.pid)) {
        void this.teardown(row, 'failed', 'qemu exited unexpectedly');
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
      if (outcome === 'deleted') this.store.update(row.id, { state: 'destroying' });
      const live = this.live.get(row.id);
      this.live.delete(row.id);
      if (live?.ttl) clearTimeout(live.ttl);
      const orphanTimer = this.orphanTimers.get(row.id);
      if (orphanTimer) clearTimeout(orphanTimer);
      live?.agent?.close();
      live?.console.stop();
      const pid = live?.pid ?? row.pid;
      if (pid !== null && pid !== undefined && isQemuOf(pid, row.id))
        await stopQemu(pid, runPaths(row.run_dir).qmp);
      if (!(await releaseCgroup(row.id))) this.log('warn', 'cgroup not removed yet', { id: row.id });
      rmSync(row.run_dir, { recursive: true, force: true });
      if (outcome === 'deleted') {
        this.store.delete(row.id);
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

  async exec(owner: string, idOrName: string, req: ExecRequest): Promise<ExecResult> {
    const row = this.find(owner, idOrName);
    const live = this.live.get(row.id);
    if (row.state !== 'running' || !live?.agent)
      throw new HutchError(
        'MACHINE_NOT_RUNNING',
        `machine ${row.id} is ${row.state}${row.error ? `: ${row.error}` : ''}`,
      );
    const t0 = performance.now();
    try {
      const r = await live.agent.execCollect(
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
        },
      );
      return {
        exit_code: r.exitCode,
        signal: r.signal,
        timed_out: r.timedOut,
        stdout: r.stdout.toString('utf8'),
        stderr: r.stderr.toString('utf8'),
        truncated: r.truncated,
        duration_ms: Math.round(performance.now() - t0),
      };
    } catch (e) {
      if (e instanceof AgentError)
        throw new HutchError(
          'EXEC_FAILED',
          `cannot run ${JSON.stringify(req.argv[0])}: ${e.code}${e.agentMessage ? ` (${e.agentMessage})` : ''}`,
          {
            errno: e.code,
          },
        );
      throw new HutchError('AGENT_UNAVAILABLE', `machine ${row.id}: ${(e as Error).message}`);
    }
  }

  /**
   * Stops the engine. Machines keep running: a restarted daemon adopts them. (Their TTLs are
   * enforced again as soon as it is back.)
   */
  async close(): Promise<void> {
    this.closing = true;
    if (this.sweeper) clearInterval(this.sweeper);
    await Promise.allSettled([...this.teardowns.values()]);
    for (const live of this.live.values()) {
      if (live.ttl) clearTimeout(live.ttl);
      live.agent?.close();
      live.console.stop();
    }
    for (const t of this.orphanTimers.values()) clearTimeout(t);
    this.live.clear();
    this.store.close();
  }
}

export function clampTtl(ttl: number | undefined): number {
  if (ttl === undefined) return ttlBounds.default;
  return Math.min(ttlBounds.max, Math.max(ttlBounds.min, Math.round(ttl)));
}

function userExists(name: string): boolean {
  try {
    return readFileSync('/etc/passwd', 'utf8')
      .split('\n')
      .some((l) => l.startsWith(`${name}:`));
  } catch {
    return false;
  }
}

function safeRead(path: string): string {
  try {
    return existsSync(path) ? readFileSync(path, 'utf8') : '';
  } catch {
    return '';
  }
}
