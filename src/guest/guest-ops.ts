import type { Readable } from 'node:stream';
import { type ErrorCode, HutchError } from '../errors.js';
import {
  type AgentConnection,
  AgentError,
  type ByteAllowance,
  type ExecHandle,
  type ExecResult,
  type ReadFileHandle,
} from './agent-connection.js';
import type { OutputChunks } from './output-chunks.js';

/**
 * What API handlers may do in a running machine or box, as typed operations whose failures are
 * already HutchErrors of the one table (src/errors.ts). The agent's errors are mapped here and
 * nowhere else, so the same errno is the same answer on every surface (machines, boxes, later
 * gRPC); handlers only move bytes. The engine hands these out (openSession, openBoxSession)
 * instead of the raw AgentConnection.
 */

/** The machine or box operations run in: what error messages name. */
export interface GuestTarget {
  kind: 'machine' | 'box';
  id: string;
}

/** Defaults of the target for commands and terminals (a box's environment and workdir). */
export interface GuestDefaults {
  env?: Record<string, string>;
  cwd?: string;
}

/**
 * The agent's errno for a file operation → the error code a client sees. Anything not listed is
 * FILE_TRANSFER_FAILED too: the guest refused, and the errno goes along in `errno`.
 */
const fileErrnos: Record<string, ErrorCode> = {
  ENOENT: 'FILE_NOT_FOUND',
  ENOTDIR: 'FILE_NOT_FOUND',
  EISDIR: 'NOT_A_FILE',
  EACCES: 'FILE_TRANSFER_FAILED',
  EPERM: 'FILE_TRANSFER_FAILED',
  EROFS: 'FILE_TRANSFER_FAILED',
  ENOSPC: 'FILE_TRANSFER_FAILED',
  EDQUOT: 'FILE_TRANSFER_FAILED',
  ENAMETOOLONG: 'FILE_TRANSFER_FAILED',
  ELOOP: 'FILE_TRANSFER_FAILED',
  EFBIG: 'FILE_TRANSFER_FAILED',
  EINVAL: 'FILE_TRANSFER_FAILED',
};

const describe = (e: AgentError): string => `${e.code}${e.agentMessage ? ` (${e.agentMessage})` : ''}`;

/**
 * The one mapping of a guest failure. An AgentError is the guest refusing: for a command, it
 * could not be started (EXEC_FAILED); for a file, see fileErrnos. Anything else (the connection
 * closed, a host timeout) means the agent is gone: AGENT_UNAVAILABLE. A HutchError stays as it is.
 */
export function guestError(
  e: unknown,
  op: { exec: string } | { file: string },
  target?: GuestTarget,
): HutchError {
  if (e instanceof HutchError) return e;
  const where = target ? `${target.kind} ${target.id}` : 'the guest';
  if (e instanceof AgentError) {
    if ('exec' in op)
      return new HutchError('EXEC_FAILED', `cannot run ${JSON.stringify(op.exec)}: ${describe(e)}`, {
        errno: e.code,
      });
    const path = op.file;
    const code = fileErrnos[e.code] ?? 'FILE_TRANSFER_FAILED';
    if (code === 'FILE_NOT_FOUND') return new HutchError(code, `no file ${JSON.stringify(path)} in ${where}`);
    if (code === 'NOT_A_FILE')
      return new HutchError(code, `${JSON.stringify(path)} is a directory`, { errno: e.code });
    return new HutchError(code, `${path}: ${describe(e)}`, { errno: e.code });
  }
  const message = e instanceof Error ? e.message : String(e);
  return new HutchError('AGENT_UNAVAILABLE', target ? `${where}: ${message}` : message);
}

export interface GuestExecRequest {
  argv: string[];
  env?: Record<string, string>;
  cwd?: string;
  /** true: the caller writes stdin (write, end); else the command reads /dev/null. */
  stdin?: boolean;
  /** Killed after this long; absent: defaultExecTimeoutMs; 0: never (the caller cancels). */
  timeoutMs?: number;
  /** Run on a terminal of this size (output is the terminal's: stdout only). */
  pty?: { cols: number; rows: number };
}

/** A command's time limit when the request names none. */
export const defaultExecTimeoutMs = 60_000;

/** A running command or terminal. */
export interface GuestProcess {
  /** Input; resolves once the bytes are on their way (the agent's window took them). */
  write(data: Buffer | string): Promise<void>;
  /** Closes the command's stdin after what was written. */
  end(): Promise<void>;
  /** A terminal's new size (ignored by commands without one). */
  resize(cols: number, rows: number): void;
  /** Kills it (SIGKILL to its process group); its output stops. */
  cancel(): void;
  /**
   * Hands every chunk of output to `onOutput`, waiting for each (backpressure), until the
   * command ends. Rejects with AGENT_UNAVAILABLE when the guest goes away, or with what
   * `onOutput` threw (the client went away): then the caller cancels.
   */
  run(onOutput: (stream: 'stdout' | 'stderr', chunk: Buffer) => Promise<void> | void): Promise<ExecResult>;
}

/** A file being read from the guest. */
export interface GuestFile {
  /**
   * Its exact size, when known before sending (content-length): the read ended within the first
   * 64 KiB, or the guest's stat says more than was read (pseudo-files say 0 or 4096 whatever
   * they hold, and are shorter than 64 KiB, so their stat is never trusted).
   */
  size: number | undefined;
  /** The bytes; fails (mapped) if the read fails or the file changes size while it is read. */
  chunks(): AsyncGenerator<Buffer>;
  /** Stops the read in the guest (the reader went away). A no-op once it has ended. */
  close(): void;
}

export interface TerminalRequest {
  /** Absent: /bin/bash, else /bin/sh (images without bash). */
  shell?: string | undefined;
  cols: number;
  rows: number;
  term: string;
}

/** What readFile reads before it answers (see GuestFile.size). */
const fileHeadBytes = 64 * 1024;
/** The size probe beside a read; a guest that does not answer in time just gets no content-length. */
const statTimeoutMs = 10_000;

const noop = (): void => {};

export class GuestOps {
  constructor(
    private readonly agent: AgentConnection,
    readonly target: GuestTarget,
    private readonly defaults: GuestDefaults,
    /** Ends the session (the target may count as idle again); once. */
    readonly release: () => void,
  ) {}

  get id(): string {
    return this.target.id;
  }

  /** Runs a command to completion, keeping at most maxOutputBytes of each stream. */
  async execBuffered(
    req: GuestExecRequest & { stdinData?: Buffer | string },
    opts: { maxOutputBytes: number; allowance?: ByteAllowance; signal?: AbortSignal | undefined },
  ): Promise<ExecResult & { stdout: OutputChunks; stderr: OutputChunks; truncated: boolean }> {
    const { stdinData, ...rest } = req;
    try {
      return await this.agent.execBuffered(this.execRequest(rest), {
        ...(stdinData !== undefined ? { stdin: stdinData } : {}),
        ...opts,
      });
    } catch (e) {
      throw guestError(e, { exec: req.argv[0] ?? '' }, this.target);
    }
  }

  /** Starts a command whose output streams (resolves once it runs: EXEC_FAILED if it cannot). */
  async exec(req: GuestExecRequest): Promise<GuestProcess> {
    return this.start(this.execRequest(req));
  }

  /** A shell on a PTY, with the target's environment and working directory. */
  async terminal(req: TerminalRequest): Promise<GuestProcess> {
    const open = (shell: string): Promise<GuestProcess> =>
      this.start({
        argv: [shell],
        env: { ...(this.defaults.env ?? {}), TERM: req.term },
        cwd: this.defaults.cwd ?? '/root',
        stdin: true,
        pty: { cols: req.cols, rows: req.rows },
      });
    if (req.shell !== undefined) return open(req.shell);
    try {
      return await open('/bin/bash');
    } catch (e) {
      if (!(e instanceof HutchError) || e.details?.errno !== 'ENOENT') throw e;
      return open('/bin/sh');
    }
  }

  /** Writes a file atomically (temporary file renamed into place). */
  async writeFile(
    path: string,
    data: Buffer | Readable,
    opts: { mode?: number; mkdirs?: boolean } = {},
  ): Promise<{ size: number }> {
    try {
      return await this.agent.writeFile(path, data, opts);
    } catch (e) {
      throw guestError(e, { file: path }, this.target);
    }
  }

  /**
   * Opens a file for reading. Its first 64 KiB are read before this resolves, so a file that is
   * missing or unreadable fails here (a proper error, not a cut connection) and a small one has
   * its exact size; the guest's stat runs beside the read for the size of a bigger one.
   */
  async readFile(path: string): Promise<GuestFile> {
    const fail = (e: unknown): HutchError => guestError(e, { file: path }, this.target);
    let h: ReadFileHandle;
    try {
      h = this.agent.readFile(path);
    } catch (e) {
      throw fail(e);
    }
    h.done.catch(noop);
    const stat = this.agent
      .execCollect(
        { argv: ['stat', '-L', '-c', '%F:%s', '--', path], timeoutMs: statTimeoutMs },
        { maxOutputBytes: 4096 },
      )
      .then((r) => {
        const m = /^regular (?:empty )?file:(\d+)\n?$/.exec(r.stdout.toString('utf8'));
        return r.exitCode === 0 && m?.[1] ? Number(m[1]) : undefined;
      })
      .catch(() => undefined);
    const it = (h.stream as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
    const head: Buffer[] = [];
    let headBytes = 0;
    let ended = false;
    try {
      while (headBytes < fileHeadBytes) {
        const r = await it.next();
        if (r.done) {
          ended = true;
          break;
        }
        head.push(r.value);
        headBytes += r.value.length;
      }
    } catch (e) {
      h.stream.destroy();
      throw fail(e);
    }
    const statSize = await stat;
    const size = ended ? headBytes : statSize !== undefined && statSize > headBytes ? statSize : undefined;
    const stream = h.stream;
    const done = h.done;
    return {
      size,
      close: () => stream.destroy(),
      async *chunks() {
        let sent = 0;
        const check = (b: Buffer): Buffer => {
          sent += b.length;
          if (size !== undefined && sent > size)
            throw new HutchError('FILE_TRANSFER_FAILED', `${path} grew while it was read`);
          return b;
        };
        try {
          for (const b of head) yield check(b);
          if (!ended)
            for (;;) {
              let r: IteratorResult<Buffer>;
              try {
                r = await it.next();
              } catch (e) {
                throw fail(e);
              }
              if (r.done) break;
              yield check(r.value);
            }
          await done.catch((e: unknown) => {
            throw fail(e);
          });
          if (size !== undefined && sent !== size)
            throw new HutchError('FILE_TRANSFER_FAILED', `${path} changed size while it was read`);
        } finally {
          // Whatever ended the reader (done, an error, a consumer that left), the read in the
          // guest ends too instead of waiting for a reader that is gone.
          stream.destroy();
        }
      },
    };
  }

  private execRequest(req: GuestExecRequest): Parameters<AgentConnection['exec']>[0] {
    const env =
      req.env || this.defaults.env ? { ...(this.defaults.env ?? {}), ...(req.env ?? {}) } : undefined;
    const cwd = req.cwd ?? this.defaults.cwd;
    return {
      argv: req.argv,
      ...(env ? { env } : {}),
      ...(cwd ? { cwd } : {}),
      ...(req.stdin ? { stdin: true } : {}),
      ...(req.pty ? { pty: req.pty } : {}),
      timeoutMs: req.timeoutMs ?? defaultExecTimeoutMs,
    };
  }

  private async start(req: Parameters<AgentConnection['exec']>[0]): Promise<GuestProcess> {
    const what = { exec: req.argv[0] ?? '' };
    let h: ExecHandle | undefined;
    try {
      h = this.agent.exec(req);
      h.result.catch(noop);
      await h.started;
    } catch (e) {
      h?.cancel();
      throw guestError(e, what, this.target);
    }
    return this.process(h, what);
  }

  private process(h: ExecHandle, what: { exec: string }): GuestProcess {
    const lost = (e: unknown): HutchError => guestError(e, what, this.target);
    return {
      write: (data) => h.write(data),
      end: () => h.end(),
      resize: (cols, rows) => h.resize(cols, rows),
      cancel: () => h.cancel(),
      run: async (onOutput) => {
        const pump = async (r: Readable, stream: 'stdout' | 'stderr'): Promise<void> => {
          const it = (r as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
          for (;;) {
            let n: IteratorResult<Buffer>;
            try {
              n = await it.next();
            } catch (e) {
              throw lost(e);
            }
            if (n.done) return;
            await onOutput(stream, n.value);
          }
        };
        const [result] = await Promise.all([
          h.result.catch((e: unknown) => {
            throw lost(e);
          }),
          pump(h.stdout, 'stdout'),
          pump(h.stderr, 'stderr'),
        ]);
        return result;
      },
    };
  }
}
