import { mkdirSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { HutchError } from '../errors.js';
import type { AgentConnection } from '../guest/agent-connection.js';
import { guestError } from '../guest/guest-ops.js';
import { MAX_PAYLOAD } from '../guest/protocol.js';
import { execPayloadBound } from '../guest/protocol-messages.js';
import { type BoxSpec, boxSpecOf, type ExecView, toExecView } from './box-view.js';
import { ByteBudget, type ExecEvent, ExecLog, endOrphanLog, replayExec, Utf8Chunker } from './exec-log.js';
import { newExecId } from './ids.js';
import type { ExecRow, MachineRow, Store } from './store.js';

export interface BoxExecRequest {
  cmd: string[];
  env?: Record<string, string>;
  workdir?: string;
  timeoutMs?: number;
}

/** An exec while it runs: its log (for live readers) and a way to end it. */
interface LiveExec {
  boxId: string;
  log: ExecLog;
  cancel: () => void;
  finished: Promise<void>;
}

/** The environment of a box exec: the image's, then the box's, then the exec's own. */
export function execEnv(spec: BoxSpec, extra: Record<string, string> | undefined): Record<string, string> {
  const env: Record<string, string> = {};
  for (const kv of spec.image_env) {
    const i = kv.indexOf('=');
    if (i > 0) env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return { ...env, ...(spec.env ?? {}), ...(extra ?? {}) };
}

/** The error for a command the agent could not start (ENOENT, EACCES, …) or lost. */
export function execError(cmd: string[], e: unknown): HutchError {
  return guestError(e, { exec: cmd[0] ?? '' });
}

const logPath = (box: MachineRow, execId: string): string => join(box.run_dir, 'execs', `${execId}.ndjson`);

/**
 * The execs of the boxes API: a row each in the store, an event log each beside its box, and
 * the streams of the running ones. The engine finds the box and its agent; this owns the rest.
 */
export class BoxExecs {
  private readonly live = new Map<string, LiveExec>();
  /** Exec logs of every box together, and of each box. */
  private readonly total: ByteBudget;
  private readonly perBox = new Map<string, ByteBudget>();
  /** How execs ended that the store could not record yet (a full disk); retried by flush(). */
  private readonly unsaved = new Map<string, Partial<ExecRow>>();

  constructor(
    private readonly store: Store,
    private readonly limits: { perExec: number; perBox: number; total: number },
    private readonly log: (msg: string, fields: Record<string, unknown>) => void,
  ) {
    this.total = new ByteBudget(limits.total);
    // What earlier daemons' execs left on disk counts from the start.
    for (const row of store.list()) if (row.kind === 'box') this.total.used += this.budgetOf(row).used;
  }

  private budgetOf(box: MachineRow): ByteBudget {
    let b = this.perBox.get(box.id);
    if (!b) {
      let used = 0;
      const dir = join(box.run_dir, 'execs');
      try {
        for (const f of readdirSync(dir)) used += statSync(join(dir, f)).size;
      } catch {
        // no execs yet
      }
      b = new ByteBudget(this.limits.perBox, used);
      this.perBox.set(box.id, b);
    }
    return b;
  }

  /** A removed box's logs are gone with its run dir: their bytes go back to the total. */
  forget(boxId: string): void {
    const b = this.perBox.get(boxId);
    if (b) this.total.give(b.used);
    this.perBox.delete(boxId);
  }

  /** Records the ends the store refused earlier (called periodically; cheap when none). */
  flush(): void {
    for (const [id, fields] of this.unsaved) {
      try {
        this.store.updateExec(id, fields);
        this.unsaved.delete(id);
      } catch {
        return; // still full: next time
      }
    }
  }

  private withUnsaved(row: ExecRow): ExecRow {
    const u = this.unsaved.get(row.id);
    return u ? { ...row, ...u } : row;
  }

  /** Execs left running by a daemon that died: their streams died with its agent connection. */
  endOrphans(reason: string): void {
    for (const x of this.store.runningExecs()) {
      const box = this.store.get(x.box_id);
      if (box) endOrphanLog(logPath(box, x.id), reason);
      this.store.updateExec(x.id, { status: 'failed', error: reason, finished_at: new Date().toISOString() });
    }
  }

  /**
   * Starts a command. Its row and log exist before anything runs in the guest: when the host
   * cannot record an exec (a full disk: STORAGE_FULL), the command never starts.
   */
  async start(box: MachineRow, agent: AgentConnection, req: BoxExecRequest): Promise<ExecView> {
    const spec = boxSpecOf(box);
    const env = execEnv(spec, req.env);
    const cwd = req.workdir ?? spec.workdir;
    // The request was checked alone; with the image's and the box's environment it may not fit.
    const size = execPayloadBound({ argv: req.cmd, env, cwd });
    if (size > MAX_PAYLOAD)
      throw new HutchError(
        'INVALID_ARGUMENT',
        `the command with the box's environment takes ${size} bytes encoded, over the limit of ${MAX_PAYLOAD} bytes (one agent protocol frame)`,
      );
    const id = newExecId();
    this.store.insertExec({
      id,
      box_id: box.id,
      cmd: JSON.stringify(req.cmd),
      status: 'running',
      exit_code: null,
      signal: null,
      error: null,
      created_at: new Date().toISOString(),
      finished_at: null,
    });
    let log: ExecLog;
    let handle: ReturnType<AgentConnection['exec']>;
    try {
      try {
        mkdirSync(join(box.run_dir, 'execs'), { recursive: true, mode: 0o700 });
        log = new ExecLog(logPath(box, id), this.limits.perExec, [this.budgetOf(box), this.total]);
      } catch (e) {
        throw new HutchError('STORAGE_FULL', `cannot create the exec's log: ${(e as Error).message}`);
      }
      handle = agent.exec({
        argv: req.cmd,
        env,
        cwd,
        stdin: false,
        ...(req.timeoutMs ? { timeoutMs: req.timeoutMs } : {}),
      });
      handle.result.catch(() => {}); // observed below, once it has started
      try {
        await handle.started;
      } catch (e) {
        log.close();
        throw execError(req.cmd, e);
      }
    } catch (e) {
      // Nothing ran: no trace of the exec is kept (best effort on a full disk).
      rmSync(logPath(box, id), { force: true });
      try {
        this.store.deleteExec(id);
      } catch {
        this.unsaved.set(id, {
          status: 'failed',
          error: (e as Error).message,
          finished_at: new Date().toISOString(),
        });
      }
      throw e;
    }
    let cancelled = false;
    const pipe = (stream: 'stdout' | 'stderr', r: NodeJS.ReadableStream): Promise<void> => {
      const chunker = new Utf8Chunker();
      const put = (c: { data: string; encoding?: 'base64' } | undefined): void => {
        if (c && !log.done) log.append({ event: 'log', stream, ...c });
      };
      return new Promise<void>((resolve) => {
        r.on('data', (b: Buffer) => put(chunker.push(b)));
        const end = (): void => {
          put(chunker.flush());
          resolve();
        };
        r.on('end', end);
        r.on('close', end);
        r.on('error', end);
      });
    };
    const outputs = Promise.all([pipe('stdout', handle.stdout), pipe('stderr', handle.stderr)]);
    const finished = handle.result.then(
      async (r) => {
        await outputs;
        this.finish(id, log, {
          status: r.timedOut ? 'timed_out' : 'completed',
          exit_code: r.exitCode,
          signal: r.signal,
          error: r.timedOut ? `killed after its timeout of ${req.timeoutMs} ms` : null,
        });
      },
      (e: unknown) =>
        this.finish(
          id,
          log,
          cancelled
            ? { status: 'cancelled', exit_code: null, signal: 9, error: 'cancelled' }
            : { status: 'failed', exit_code: null, signal: null, error: (e as Error).message },
        ),
    );
    finished.catch((e: unknown) => this.log('exec end failed', { id, error: (e as Error).message }));
    this.live.set(id, {
      boxId: box.id,
      log,
      cancel: () => {
        cancelled = true;
        handle.cancel();
      },
      finished,
    });
    return toExecView(this.store.getExec(id) as ExecRow);
  }

  /** Records how an exec ended and writes its exit event (once: later calls do nothing). */
  private finish(
    id: string,
    log: ExecLog,
    fields: Pick<ExecRow, 'status' | 'exit_code' | 'signal' | 'error'>,
  ): void {
    this.live.delete(id);
    if (log.done) return;
    const ended = { ...fields, finished_at: new Date().toISOString() };
    try {
      this.store.updateExec(id, ended);
    } catch (e) {
      // The exit event below still reaches readers; the row catches up when there is space.
      this.unsaved.set(id, ended);
      this.log('exec end not recorded yet', { id, error: (e as Error).message });
    }
    log.append({
      event: 'exit',
      stream: null,
      data: JSON.stringify({
        exit_code: fields.exit_code,
        status: fields.status,
        signal: fields.signal,
        error: fields.error,
        ...(log.truncated ? { truncated: true } : {}),
      }),
    });
  }

  private find(box: MachineRow, execId: string): ExecRow {
    const exec = this.store.getExec(execId);
    if (!exec || exec.box_id !== box.id)
      throw new HutchError('EXEC_NOT_FOUND', `box ${box.id} has no exec ${JSON.stringify(execId)}`);
    return this.withUnsaved(exec);
  }

  list(box: MachineRow): ExecView[] {
    return this.store.listExecs(box.id).map((r) => toExecView(this.withUnsaved(r)));
  }

  get(box: MachineRow, execId: string): ExecView {
    return toExecView(this.find(box, execId));
  }

  events(box: MachineRow, execId: string): AsyncGenerator<ExecEvent> {
    const exec = this.find(box, execId);
    return replayExec(logPath(box, exec.id), this.live.get(exec.id)?.log);
  }

  async cancel(box: MachineRow, execId: string): Promise<ExecView> {
    const exec = this.find(box, execId);
    const live = this.live.get(exec.id);
    if (live) {
      live.cancel();
      await live.finished;
    }
    return toExecView(this.withUnsaved(this.store.getExec(exec.id) as ExecRow));
  }

  /** A box's VM went away (stopped, removed): its running execs end as failed, exit event written. */
  failAll(boxId: string, reason: string): void {
    for (const [id, e] of this.live)
      if (e.boxId === boxId)
        this.finish(id, e.log, { status: 'failed', exit_code: null, signal: null, error: reason });
  }
}
