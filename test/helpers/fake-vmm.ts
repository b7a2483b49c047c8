// A hypervisor and guest link that keep their "VMs" in memory, for the engine's unit tests:
// lifecycle transitions, crash recovery and the cleanup stack, in milliseconds and without QEMU.
// Processes "outlive" an engine that is closed or dropped, like QEMU outlives the daemon.
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import type { AgentConnection } from '../../src/guest/agent-connection.js';
import { OutputChunks } from '../../src/guest/output-chunks.js';
import { ConsoleTap } from '../../src/vmm/console.js';
import type { GuestLink, Hypervisor, Qmp, VmProcess } from '../../src/vmm/hypervisor.js';
import type { VmSpec } from '../../src/vmm/qemu.js';

export interface FakeVm {
  pid: number;
  id: string;
  runDir: string;
  alive: boolean;
  status: 'running' | 'paused' | 'inmigrate';
  /** What the guest "has": files written by execs survive save/load like memory would. */
  memory: Record<string, string>;
  spec: VmSpec;
  agents: FakeAgent[];
}

/** Faults a test can ask for. */
export interface FakeFaults {
  /** saveState fails (a full disk, a migration error). */
  saveFails?: boolean;
  /** The guest never answers its agent (a boot that hangs, a broken agent). */
  agentDead?: boolean;
  /** launch throws (a missing binary). */
  launchFails?: boolean;
}

export class FakeAgent {
  private closeWith!: (e: Error | undefined) => void;
  readonly closed: Promise<Error | undefined> = new Promise((r) => {
    this.closeWith = r;
  });
  isOpen = true;
  configured: Record<string, unknown>[] = [];

  constructor(readonly vm: FakeVm) {}

  close(): void {
    if (!this.isOpen) return;
    this.isOpen = false;
    this.closeWith(undefined);
  }

  /** The link broke under the engine (QEMU died, the guest corrupted its port). */
  drop(why: string): void {
    if (!this.isOpen) return;
    this.isOpen = false;
    this.closeWith(new Error(why));
  }

  async reset(): Promise<void> {}

  supports(_feature: string): boolean {
    return true;
  }

  async configure(opts: Record<string, unknown>): Promise<void> {
    this.configured.push(opts);
  }

  async poweroff(): Promise<void> {
    this.vm.alive = false;
    this.close();
  }

  /** `sh -c "echo X > F"` writes guest memory; `cat F` reads it; anything else echoes argv. */
  async execBuffered(
    req: { argv: string[] },
    _opts: unknown,
  ): Promise<{
    exitCode: number;
    signal: null;
    timedOut: boolean;
    stdout: OutputChunks;
    stderr: OutputChunks;
    truncated: boolean;
  }> {
    if (!this.isOpen || !this.vm.alive) throw new Error('agent connection closed');
    const out = new OutputChunks();
    const [cmd, ...args] = req.argv;
    if (cmd === 'write' && args[0] !== undefined) this.vm.memory[args[0]] = args[1] ?? '';
    else if (cmd === 'read' && args[0] !== undefined) out.push(Buffer.from(this.vm.memory[args[0]] ?? ''));
    else out.push(Buffer.from(req.argv.join(' ')));
    return {
      exitCode: 0,
      signal: null,
      timedOut: false,
      stdout: out,
      stderr: new OutputChunks(),
      truncated: false,
    };
  }

  async execCollect(req: { argv: string[] }, opts: unknown): Promise<unknown> {
    return this.execBuffered(req, opts);
  }
}

export class FakeVmm {
  readonly vms = new Map<number, FakeVm>();
  readonly faults: FakeFaults = {};
  readonly calls: string[] = [];
  private nextPid = 4_000_000;
  /** Where machines' RAM files go (tmpfs on a real host). */
  readonly ramDir = mkdtempSync(join(tmpdir(), 'hutch-fake-ram-'));

  /** RAM files that exist now. */
  ramFiles(): string[] {
    return readdirSync(this.ramDir);
  }

  /** VMs that run now. */
  running(): FakeVm[] {
    return [...this.vms.values()].filter((v) => v.alive);
  }

  byRunDir(runDir: string): FakeVm | undefined {
    return [...this.vms.values()].reverse().find((v) => v.alive && v.runDir === runDir);
  }

  /** QEMU dies under the engine (an OOM kill, a crash). */
  crash(id: string): void {
    for (const v of this.vms.values())
      if (v.id === id && v.alive) {
        v.alive = false;
        for (const a of v.agents) a.drop('qemu exited');
      }
  }

  readonly hypervisor: Hypervisor = {
    cgroups: 'none',
    launch: (spec) => {
      this.calls.push(`launch ${spec.id}`);
      if (this.faults.launchFails) throw new Error('cannot start qemu');
      const pid = this.nextPid++;
      // A snapshot being taken writes its RAM into the file it was given.
      if (spec.memory?.kind === 'file' && spec.memory.share && !existsSync(spec.memory.path))
        writeFileSync(spec.memory.path, 'ram');
      this.vms.set(pid, {
        pid,
        id: spec.id,
        runDir: spec.runDir,
        alive: true,
        status: spec.incoming ? 'inmigrate' : 'running',
        memory: {},
        spec,
        agents: [],
      });
      return pid;
    },
    isAlive: (pid) => this.vms.get(pid)?.alive === true,
    isVmOf: (pid, id) => {
      const v = this.vms.get(pid);
      return v?.alive === true && v.id === id;
    },
    list: (): VmProcess[] =>
      this.running().map((v) => ({
        pid: v.pid,
        id: v.id,
        argv: ['qemu', '-name', `guest=hutch-${v.id}`, v.runDir],
      })),
    kill: async (pid) => {
      this.calls.push(`kill ${pid}`);
      const v = this.vms.get(pid);
      if (v) v.alive = false;
      return true;
    },
    stop: async (pid) => {
      this.calls.push(`stop ${this.vms.get(pid)?.id}`);
      const v = this.vms.get(pid);
      if (v) v.alive = false;
    },
    qmp: async (socket) => {
      const vm = this.byRunDir(dirname(socket));
      if (!vm) throw new Error(`connect ENOENT ${socket}`);
      return fakeQmp(vm);
    },
    saveState: async (_qmp, migDir, out) => {
      if (this.faults.saveFails) throw new Error('migration failed: No space left on device');
      const vm = this.byRunDir(dirname(migDir));
      if (!vm) throw new Error('no vm');
      writeFileSync(out, JSON.stringify(vm.memory));
      return { bytes: 10, ms: 1 };
    },
    loadState: async (_qmp, migDir, file) => {
      const vm = this.byRunDir(dirname(migDir));
      if (!vm) throw new Error('no vm');
      vm.memory = JSON.parse(readFileSync(file, 'utf8')) as Record<string, string>;
      vm.status = 'paused';
      return { bytes: 10, ms: 1 };
    },
    saveMachine: async (_qmp, migDir, save) => {
      if (this.faults.saveFails) throw new Error('migration failed: No space left on device');
      const vm = this.byRunDir(dirname(migDir));
      if (!vm) throw new Error('no vm');
      if (save.memory) copyFileSync(save.memory.from, save.memory.to);
      writeFileSync(save.state, JSON.stringify(vm.memory));
      return {
        stateBytes: 10,
        stateMs: 1,
        memoryBytes: 0,
        memoryMs: 0,
        ignoreShared: save.memory !== undefined,
      };
    },
    ram: {
      fileOf: (id) => join(this.ramDir, `${id}.ram`),
      create: (path) => writeFileSync(path, ''),
      copy: async (from, to) => {
        copyFileSync(from, to);
        return 0;
      },
      remove: (path) => rmSync(path, { force: true }),
      sweep: (keep) => {
        const gone: string[] = [];
        for (const f of readdirSync(this.ramDir)) {
          const id = f.replace(/\.ram$/, '');
          if (keep(id)) continue;
          rmSync(join(this.ramDir, f), { force: true });
          gone.push(id);
        }
        return gone;
      },
    },
    chargeTo: () => undefined,
    confine: () => 'v2',
    releaseCgroup: async () => true,
    listCgroups: () => [],
    console: (socket, log) => new ConsoleTap(socket, log),
    createOverlay: async (_base, overlay) => writeFileSync(overlay, 'disk'),
    copyDisk: (from, to) => copyFileSync(from, to),
  };

  readonly guest: GuestLink = {
    connect: async (socket) => this.agentAt(socket),
    connectBooting: async (_pid, runDir) => this.agentAt(`${runDir}/agent.sock`),
  };

  private agentAt(socket: string): AgentConnection {
    const vm = this.byRunDir(dirname(socket));
    if (!vm || basename(socket) !== 'agent.sock') throw new Error(`connect ENOENT ${socket}`);
    if (this.faults.agentDead || vm.status !== 'running') throw new Error('agent did not answer');
    const a = new FakeAgent(vm);
    vm.agents.push(a);
    return a as unknown as AgentConnection;
  }
}

function fakeQmp(vm: FakeVm): Qmp {
  let open = true;
  return {
    execute: async <T>(command: string): Promise<T> => {
      if (!vm.alive) throw new Error('qmp: connection closed');
      if (command === 'stop') vm.status = 'paused';
      else if (command === 'cont') vm.status = 'running';
      else if (command === 'quit') vm.alive = false;
      return (command === 'query-status' ? { status: vm.status } : {}) as T;
    },
    close: () => {
      open = false;
    },
    isOpen: () => open && vm.alive,
  };
}

/** Whether a path is gone (a run dir after an end). */
export function gone(path: string): boolean {
  return !existsSync(path);
}
