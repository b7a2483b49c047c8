// Host end of one connection to hutch-agent (docs/agent-protocol.md).
//
// The guest is hostile: every byte count, stream id and length that comes from it is
// checked here. Memory held for the agent is bounded by construction: the decoder holds at
// most one frame, each stream queues at most its receive window (262144 bytes) of output,
// and the window is re-opened (CREDIT) only as the consumer actually reads. Any violation
// closes the connection with a ProtocolError; nothing thrown by guest input escapes.

import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { type Duplex, Readable } from 'node:stream';
import { OutputChunks } from './output-chunks.js';
import {
  ALL_FEATURES,
  decodeMessage,
  encodeConfigure,
  encodeCredit,
  encodeExec,
  encodeFileRead,
  encodeFileWrite,
  encodeFrame,
  encodeHello,
  encodePing,
  encodeResize,
  encodeSignal,
  encodeUnsupported,
  type FeatureName,
  type Frame,
  FrameDecoder,
  FrameType,
  featureNames,
  fixedValue,
  frameTypeName,
  type HelloInfo,
  INITIAL_WINDOW,
  isKnownFrameType,
  LEGACY_FEATURES,
  MAX_PAYLOAD,
  MAX_STREAM_ID,
  type Message,
  PROTOCOL_VERSION,
  ProtocolError,
  parseDone,
  parseError,
  parseExit,
  parseHello,
  parseUnsupported,
  SequenceScanner,
  type UnsupportedInfo,
} from './protocol.js';

// ---------------------------------------------------------------------------------------
// Public types

export interface ExecRequest {
  argv: string[];
  env?: Record<string, string>;
  cwd?: string;
  /** true: the host sends stdin (write/end); false/absent: the child reads /dev/null. */
  stdin?: boolean;
  pty?: { cols: number; rows: number };
  /** Enforced by the agent (SIGKILL to the process group); 0 or absent = none. */
  timeoutMs?: number;
}

export interface ExecResult {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
}

export interface StreamStats {
  /** Payload bytes received from the agent on this stream. */
  received: number;
  /** Payload bytes handed to the consumer (and credited back to the agent). */
  consumed: number;
  /** Payload bytes waiting in the host's queue for the consumer. */
  queued: number;
  /** Payload bytes sent to the agent (stdin / file data). */
  sent: number;
}

export interface ExecHandle {
  readonly id: number;
  readonly started: Promise<{ pid: number }>;
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Sends stdin bytes, waiting for the agent's window; resolves once they are on the wire. */
  write(data: Buffer | string): Promise<void>;
  /** Closes the child's stdin (after the pending writes). */
  end(): Promise<void>;
  /** Sends a signal to the child's process group. */
  signal(signal: number): void;
  resize(cols: number, rows: number): void;
  /** SIGKILLs the process group; the output is dropped from now on. */
  cancel(): void;
  readonly result: Promise<ExecResult>;
  stats(): StreamStats;
}

/** A share of a bytes budget: `take` grants what is left of n (maybe 0), `release` gives it back. */
export interface ByteAllowance {
  take(n: number): number;
  release(n: number): void;
}

export interface ExecCollectResult extends ExecResult {
  stdout: Buffer;
  stderr: Buffer;
  truncated: boolean;
}

export interface ReadFileHandle {
  readonly stream: Readable;
  readonly done: Promise<{ size: number; mode: number }>;
}

/**
 * A restored machine's own identity (CONFIGURE). Every field is optional; the agent applies
 * them in the order hostname, machineId, entropy, timeNs.
 */
export interface ConfigureOptions {
  /** Shares to mount (needs the configure-volumes feature). */
  volumes?: readonly { tag: string; path: string; readonly: boolean }[];
  /** Grow / to its disk first (needs configure-grow-root; a version-1 agent always does). */
  growRoot?: boolean;
  /** 1–64 bytes of [A-Za-z0-9.-]; set with sethostname() and written to /etc/hostname. */
  hostname?: string;
  /** Unix epoch nanoseconds for the guest's CLOCK_REALTIME. */
  timeNs?: bigint;
  /** 1–512 bytes (from the host's CSPRNG) mixed into the guest kernel's RNG, which reseeds. */
  entropy?: Buffer;
  /** 32 lower-case hex digits, written to /etc/machine-id. */
  machineId?: string;
}

export interface ConnectionStats {
  openStreams: number;
  ignoredFrames: number;
  /** Frames of a type this host does not know, skipped (and answered with UNSUPPORTED). */
  unknownFrames: number;
}

/** What the agent said it speaks in the handshake (version 1: it did not answer HELLO). */
export interface AgentFeatures {
  version: number;
  /** Every bit announced, including bits this host has no name for. */
  bits: bigint;
  /** The announced features this host knows. */
  names: ReadonlySet<FeatureName>;
}

/** An ERROR frame from the agent (`code` is e.g. ENOENT, EACCES, EINVAL). */
export class AgentError extends Error {
  readonly code: string;
  readonly agentMessage: string;
  constructor(code: string, agentMessage: string, context: string) {
    super(`${context}: ${code}${agentMessage ? `: ${agentMessage}` : ''}`);
    this.name = 'AgentError';
    this.code = code;
    this.agentMessage = agentMessage;
  }
}

/** Why an operation could not complete: the connection is gone. `cause` tells why. */
export class AgentClosedError extends Error {
  readonly code = 'EAGENTCLOSED';
  constructor(reason: Error | undefined) {
    super(
      `agent connection closed${reason ? `: ${reason.message}` : ''}`,
      reason ? { cause: reason } : undefined,
    );
    this.name = 'AgentClosedError';
  }
}

/** The host gave up on an operation (cancel(), a consumer that went away, a host timeout). */
export class AgentCancelledError extends Error {
  readonly code = 'ECANCELED';
  constructor(message: string) {
    super(message);
    this.name = 'AgentCancelledError';
  }
}

export class AgentTimeoutError extends Error {
  readonly code = 'ETIMEDOUT';
  constructor(message: string) {
    super(message);
    this.name = 'AgentTimeoutError';
  }
}

// ---------------------------------------------------------------------------------------
// Limits

/** Frames for unknown or finished streams tolerated before the agent is deemed hostile. */
export const MAX_IGNORED_FRAMES = 4096;
/** Readable buffer of an output stream; bytes are credited when they move into it. */
const READABLE_HWM = 65536;
/** Credit is batched up to this much (or sent when a queue drains). */
const CREDIT_BATCH = 32768;
/** After CANCEL, how long the agent gets to finish the stream before the host forgets it. */
const CANCEL_GRACE_MS = 5000;
/** Host-side backstop beyond an exec's own timeout. */
const EXEC_TIMEOUT_GRACE_MS = 5000;
/** Payloads smaller than this are coalesced into shared buffers while queued. */
const SMALL_CHUNK = 4096;
const COALESCE_SIZE = 16384;
/** How often PING is repeated while waiting for the handshake PONG. */
const HANDSHAKE_REPING_MS = 1000;

// ---------------------------------------------------------------------------------------
// Small helpers

const noop = (): void => {};

interface Deferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(err: Error): void;
  settled: boolean;
}

/** A promise that never counts as an unhandled rejection (callers still see the error). */
function deferred<T>(): Deferred<T> {
  let res!: (value: T) => void;
  let rej!: (err: Error) => void;
  const promise = new Promise<T>((resolve, reject) => {
    res = resolve;
    rej = reject;
  });
  promise.catch(noop);
  const d: Deferred<T> = {
    promise,
    settled: false,
    resolve(value) {
      if (d.settled) return;
      d.settled = true;
      res(value);
    },
    reject(err) {
      if (d.settled) return;
      d.settled = true;
      rej(err);
    },
  };
  return d;
}

function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(noop);
  return p;
}

function toError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

function checkAbsolute(path: string): void {
  if (!path.startsWith('/')) throw new TypeError(`path must be absolute: ${JSON.stringify(path)}`);
}

/** Ends a stream we produce after a failure without risking an unhandled 'error' event. */
function failReadable(r: Readable, err: Error): void {
  if (r.destroyed) return;
  if (r.listenerCount('error') > 0) r.destroy(err);
  else r.destroy();
}

// ---------------------------------------------------------------------------------------
// Inbound data: a bounded queue feeding a Readable, crediting the agent as it is consumed

interface QueueItem {
  buf: Buffer;
  len: number;
  shared: boolean;
}

class InboundChannel {
  readonly readable: Readable;
  received = 0;
  consumed = 0;
  private readonly queue: QueueItem[] = [];
  private queuedBytes = 0;
  private wanting = false;
  private eof = false;
  private endPushed = false;
  private discarding = false;
  private pumping = false;

  constructor(
    private readonly credit: (bytes: number, flush: boolean) => void,
    private readonly onConsumerGone: () => void,
  ) {
    this.readable = new Readable({
      highWaterMark: READABLE_HWM,
      read: () => {
        this.wanting = true;
        this.pump();
      },
      destroy: (err, cb) => {
        this.consumerGone();
        cb(err);
      },
    });
  }

  get queued(): number {
    return this.queuedBytes;
  }

  /** Payload bytes from the agent (the window is checked by the caller). */
  deliver(data: Buffer): void {
    if (data.length === 0) return;
    this.received += data.length;
    if (this.discarding || this.eof) {
      this.consumed += data.length;
      this.credit(data.length, true);
      return;
    }
    this.enqueue(data);
    if (this.wanting) this.pump();
  }

  /** No more data: end the Readable once the queue is drained. */
  end(): void {
    this.eof = true;
    this.pump();
  }

  /** The stream failed: drop everything and end the Readable with `err`. */
  fail(err: Error): void {
    this.eof = true;
    this.discarding = true;
    this.queue.length = 0;
    this.queuedBytes = 0;
    failReadable(this.readable, err);
  }

  /** From now on, data is credited and dropped at once (the stream is being cancelled). */
  discard(): void {
    if (this.discarding) return;
    this.discarding = true;
    const bytes = this.queuedBytes;
    this.queue.length = 0;
    this.queuedBytes = 0;
    if (bytes > 0) {
      this.consumed += bytes;
      this.credit(bytes, true);
    }
  }

  private consumerGone(): void {
    const wasOpen = !this.endPushed || this.queuedBytes > 0;
    this.discard();
    if (wasOpen) this.onConsumerGone();
  }

  private enqueue(data: Buffer): void {
    this.queuedBytes += data.length;
    if (data.length < SMALL_CHUNK) {
      const last = this.queue[this.queue.length - 1];
      if (last?.shared && last.buf.length - last.len >= data.length) {
        data.copy(last.buf, last.len);
        last.len += data.length;
        return;
      }
      const buf = Buffer.allocUnsafe(COALESCE_SIZE);
      data.copy(buf, 0);
      this.queue.push({ buf, len: data.length, shared: true });
      return;
    }
    // Copy: `data` is a view into a socket chunk that must not be retained.
    this.queue.push({ buf: Buffer.from(data), len: data.length, shared: false });
  }

  private pump(): void {
    if (this.pumping || this.readable.destroyed) return;
    this.pumping = true;
    try {
      while (this.wanting && this.queue.length > 0 && !this.readable.destroyed) {
        const item = this.queue.shift()!;
        this.queuedBytes -= item.len;
        this.consumed += item.len;
        this.credit(item.len, this.queue.length === 0);
        this.wanting = this.readable.push(item.buf.subarray(0, item.len));
      }
      if (this.eof && this.queue.length === 0 && !this.endPushed && !this.readable.destroyed) {
        this.endPushed = true;
        this.readable.push(null);
      }
    } finally {
      this.pumping = false;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Streams

interface ConnectionInternals {
  send(frame: Buffer): void;
  sendData(frame: Buffer): Promise<void>;
  fatal(err: ProtocolError): void;
  forget(stream: StreamBase): void;
}

abstract class StreamBase {
  /** Bytes the agent may still send us. */
  recvWindow = INITIAL_WINDOW;
  /** Bytes we may still send the agent. */
  sendWindow = INITIAL_WINDOW;
  sent = 0;
  /** A terminal frame arrived (or the host gave up): no frames expected any more. */
  finished = false;
  cancelled = false;
  failure: Error | null = null;
  private pendingCredit = 0;
  private windowWaiters: Deferred<void>[] = [];
  private cancelTimer: NodeJS.Timeout | null = null;

  constructor(
    readonly id: number,
    protected readonly conn: ConnectionInternals,
  ) {}

  abstract readonly what: string;
  /** Handles a frame of this stream; returns false if the type is not expected here. */
  protected abstract onMessage(msg: Message): boolean;
  /** The connection closed, or the host abandoned the stream. */
  protected abstract onAbort(err: Error): void;

  handle(msg: Message): void {
    if (msg.type === FrameType.CREDIT) {
      this.sendWindow = Math.min(this.sendWindow + fixedValue(msg), Number.MAX_SAFE_INTEGER);
      const waiters = this.windowWaiters;
      this.windowWaiters = [];
      for (const w of waiters) w.resolve();
      return;
    }
    if (this.cancelled) {
      this.onCancelledFrame(msg);
      return;
    }
    if (!this.onMessage(msg)) {
      this.conn.fatal(new ProtocolError('unexpected', `${msg.name} on ${this.what} stream ${this.id}`));
    }
  }

  /**
   * A frame that was in flight when the host sent CANCEL (the agent forgets the stream and
   * sends nothing after it): data still counts against the window and is dropped, a
   * terminal frame ends the draining at once.
   */
  private onCancelledFrame(msg: Message): void {
    switch (msg.type) {
      case FrameType.STDOUT:
      case FrameType.STDERR:
      case FrameType.DATA: {
        const f = msg.fields[0];
        this.takeWindow(f?.kind === 'bytes' ? f.value.length : 0, msg.name);
        return;
      }
      case FrameType.DONE:
      case FrameType.ERROR:
      case FrameType.EXIT:
        this.finish();
        return;
      default:
        return;
    }
  }

  /** Checks a data payload against the receive window (fatal if overrun). */
  protected takeWindow(bytes: number, name: string): boolean {
    if (bytes > this.recvWindow) {
      this.conn.fatal(
        new ProtocolError(
          'window',
          `${name} of ${bytes} bytes on stream ${this.id} exceeds the remaining window of ${this.recvWindow}`,
        ),
      );
      return false;
    }
    this.recvWindow -= bytes;
    return true;
  }

  /** Called as the consumer takes `bytes`; sends CREDIT in batches. */
  grant(bytes: number, flush: boolean): void {
    if (this.finished || this.cancelled) return;
    this.pendingCredit += bytes;
    if (this.pendingCredit >= CREDIT_BATCH || (flush && this.pendingCredit > 0)) {
      const n = this.pendingCredit;
      this.pendingCredit = 0;
      this.recvWindow += n;
      this.conn.send(encodeCredit(this.id, n));
    }
  }

  protected async waitSendWindow(): Promise<void> {
    for (;;) {
      if (this.failure) throw this.failure;
      if (this.finished) throw new AgentCancelledError(`${this.what} stream ${this.id} is over`);
      if (this.sendWindow > 0) return;
      const d = deferred<void>();
      this.windowWaiters.push(d);
      await d.promise;
    }
  }

  /** Sends payload bytes as frames of `type`, each ≤ 64 KiB and within the window. */
  protected async sendPayload(type: number, data: Buffer): Promise<void> {
    let off = 0;
    while (off < data.length) {
      await this.waitSendWindow();
      const n = Math.min(data.length - off, this.sendWindow, MAX_PAYLOAD);
      this.sendWindow -= n;
      this.sent += n;
      await this.conn.sendData(encodeFrame(type, this.id, data.subarray(off, off + n)));
      off += n;
    }
  }

  /** Marks the stream over; wakes window waiters with `err` (or a generic error). */
  protected finish(err?: Error): void {
    if (this.finished) return;
    this.finished = true;
    if (err && !this.failure) this.failure = err;
    if (this.cancelTimer) clearTimeout(this.cancelTimer);
    const waiters = this.windowWaiters;
    this.windowWaiters = [];
    const wake = this.failure ?? new AgentCancelledError(`${this.what} stream ${this.id} is over`);
    for (const w of waiters) w.reject(wake);
    this.conn.forget(this);
  }

  /**
   * Sends CANCEL and settles the operation with `reason` at once. The stream stays
   * registered for a grace period to absorb the frames already in flight.
   */
  cancelStream(reason: Error): void {
    if (this.finished || this.cancelled) return;
    this.cancelled = true;
    if (!this.failure) this.failure = reason;
    this.conn.send(encodeFrame(FrameType.CANCEL, this.id));
    const waiters = this.windowWaiters;
    this.windowWaiters = [];
    for (const w of waiters) w.reject(reason);
    this.cancelTimer = setTimeout(() => this.finish(), CANCEL_GRACE_MS);
    this.cancelTimer.unref();
    this.onAbort(reason);
  }

  /** The connection closed: settle everything with `err`. */
  abort(err: Error): void {
    if (this.finished) return;
    const wasCancelled = this.cancelled;
    this.finish(err);
    if (!wasCancelled) this.onAbort(err);
  }
}

class ExecStream extends StreamBase implements ExecHandle {
  readonly what = 'exec';
  readonly stdout: Readable;
  readonly stderr: Readable;
  private readonly out: InboundChannel;
  private readonly err: InboundChannel;
  private readonly startedD = deferred<{ pid: number }>();
  private readonly resultD = deferred<ExecResult>();
  private state: 'starting' | 'running' | 'done' = 'starting';
  private stdinChain: Promise<void> = Promise.resolve();
  private stdinEnded = false;
  private hostTimedOut = false;
  private hostTimer: NodeJS.Timeout | null = null;

  constructor(
    id: number,
    conn: ConnectionInternals,
    private readonly req: ExecRequest,
  ) {
    super(id, conn);
    const grant = (n: number, flush: boolean): void => this.grant(n, flush);
    this.out = new InboundChannel(grant, noop);
    this.err = new InboundChannel(grant, noop);
    this.stdout = this.out.readable;
    this.stderr = this.err.readable;
    if (req.timeoutMs !== undefined && req.timeoutMs > 0) {
      const limit = req.timeoutMs;
      this.hostTimer = setTimeout(() => {
        // The agent should have killed it at timeoutMs: stop waiting and kill it ourselves.
        this.hostTimedOut = true;
        this.cancelStream(
          new AgentTimeoutError(`exec ${JSON.stringify(req.argv[0] ?? '')} timed out after ${limit} ms`),
        );
      }, limit + EXEC_TIMEOUT_GRACE_MS);
      this.hostTimer.unref();
    }
  }

  get started(): Promise<{ pid: number }> {
    return this.startedD.promise;
  }

  get result(): Promise<ExecResult> {
    return this.resultD.promise;
  }

  stats(): StreamStats {
    return {
      received: this.out.received + this.err.received,
      consumed: this.out.consumed + this.err.consumed,
      queued: this.out.queued + this.err.queued,
      sent: this.sent,
    };
  }

  write(data: Buffer | string): Promise<void> {
    const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    if (!this.req.stdin)
      return handled(Promise.reject(new TypeError('exec was started without stdin: true')));
    if (this.stdinEnded) return handled(Promise.reject(new Error('write after end()')));
    const p = this.stdinChain.then(() => this.sendPayload(FrameType.STDIN, buf));
    this.stdinChain = p;
    return handled(p);
  }

  end(): Promise<void> {
    if (!this.req.stdin || this.stdinEnded) return Promise.resolve();
    this.stdinEnded = true;
    const p = this.stdinChain.then(() => {
      if (this.finished || this.cancelled) return;
      this.conn.send(encodeFrame(FrameType.STDIN, this.id));
    });
    this.stdinChain = p;
    return handled(p);
  }

  signal(signal: number): void {
    if (this.finished || this.cancelled) return;
    this.conn.send(encodeSignal(this.id, signal));
  }

  resize(cols: number, rows: number): void {
    if (this.finished || this.cancelled) return;
    this.conn.send(encodeResize(this.id, cols, rows));
  }

  cancel(): void {
    if (this.finished || this.cancelled) return;
    this.out.discard();
    this.err.discard();
    this.cancelStream(new AgentCancelledError(`exec stream ${this.id} was cancelled`));
  }

  protected onMessage(msg: Message): boolean {
    switch (msg.type) {
      case FrameType.STARTED:
        if (this.state !== 'starting') return false;
        this.state = 'running';
        this.startedD.resolve({ pid: fixedValue(msg) });
        return true;
      case FrameType.STDOUT:
      case FrameType.STDERR: {
        if (this.state !== 'running') return false;
        const data = msg.fields[0]?.kind === 'bytes' ? msg.fields[0].value : Buffer.alloc(0);
        if (!this.takeWindow(data.length, msg.name)) return true;
        (msg.type === FrameType.STDOUT ? this.out : this.err).deliver(data);
        return true;
      }
      case FrameType.EXIT: {
        if (this.state !== 'running') return false;
        const exit = parseExit(msg);
        this.done();
        this.out.end();
        this.err.end();
        this.resultD.resolve({ ...exit, timedOut: exit.timedOut || this.hostTimedOut });
        return true;
      }
      case FrameType.ERROR: {
        const e = parseError(msg);
        const err = new AgentError(e.code, e.message, `exec ${JSON.stringify(this.req.argv[0] ?? '')}`);
        const wasRunning = this.state === 'running';
        this.done(err);
        if (wasRunning) {
          this.out.fail(err);
          this.err.fail(err);
        } else {
          this.out.end();
          this.err.end();
        }
        this.startedD.reject(err);
        this.resultD.reject(err);
        return true;
      }
      default:
        return false;
    }
  }

  private done(err?: Error): void {
    this.state = 'done';
    if (this.hostTimer) clearTimeout(this.hostTimer);
    this.finish(err);
  }

  protected onAbort(err: Error): void {
    if (this.hostTimer) clearTimeout(this.hostTimer);
    if (this.hostTimedOut && this.state === 'running') {
      // Keep the output received so far; report the kill like the agent's own timeout.
      this.state = 'done';
      this.out.end();
      this.err.end();
      this.resultD.resolve({ exitCode: null, signal: 9, timedOut: true });
      return;
    }
    this.state = 'done';
    this.out.fail(err);
    this.err.fail(err);
    this.startedD.reject(err);
    this.resultD.reject(err);
  }
}

class FileReadStream extends StreamBase implements ReadFileHandle {
  readonly what = 'file-read';
  readonly stream: Readable;
  private readonly data: InboundChannel;
  private readonly doneD = deferred<{ size: number; mode: number }>();
  private eof = false;

  constructor(
    id: number,
    conn: ConnectionInternals,
    private readonly path: string,
  ) {
    super(id, conn);
    this.data = new InboundChannel(
      (n, flush) => this.grant(n, flush),
      () => this.consumerGone(),
    );
    this.stream = this.data.readable;
  }

  get done(): Promise<{ size: number; mode: number }> {
    return this.doneD.promise;
  }

  private consumerGone(): void {
    if (this.finished || this.cancelled) return;
    const err = new AgentCancelledError(`read of ${this.path} abandoned by its consumer`);
    this.doneD.reject(err);
    this.cancelStream(err);
  }

  protected onMessage(msg: Message): boolean {
    switch (msg.type) {
      case FrameType.DATA: {
        if (this.eof) return false;
        const data = msg.fields[0]?.kind === 'bytes' ? msg.fields[0].value : Buffer.alloc(0);
        if (data.length === 0) {
          this.eof = true;
          this.data.end();
          return true;
        }
        if (!this.takeWindow(data.length, 'DATA')) return true;
        this.data.deliver(data);
        return true;
      }
      case FrameType.DONE: {
        if (!this.eof) return false;
        const done = parseDone(msg);
        this.finish();
        if (done.size !== this.data.received) {
          this.doneD.reject(
            new Error(
              `read of ${this.path}: agent reported ${done.size} bytes but sent ${this.data.received}`,
            ),
          );
        } else {
          this.doneD.resolve(done);
        }
        return true;
      }
      case FrameType.ERROR: {
        const e = parseError(msg);
        const err = new AgentError(e.code, e.message, `read ${this.path}`);
        this.finish(err);
        this.data.fail(err);
        this.doneD.reject(err);
        return true;
      }
      default:
        return false;
    }
  }

  protected onAbort(err: Error): void {
    this.data.fail(err);
    this.doneD.reject(err);
  }
}

class FileWriteStream extends StreamBase {
  readonly what = 'file-write';
  private readonly doneD = deferred<{ size: number; mode: number }>();
  private eofSent = false;

  constructor(
    id: number,
    conn: ConnectionInternals,
    private readonly path: string,
  ) {
    super(id, conn);
  }

  get done(): Promise<{ size: number; mode: number }> {
    return this.doneD.promise;
  }

  async send(data: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    await this.sendPayload(FrameType.DATA, data);
  }

  sendEof(): void {
    if (this.failure) throw this.failure;
    this.eofSent = true;
    this.conn.send(encodeFrame(FrameType.DATA, this.id));
  }

  giveUp(err: Error): void {
    this.doneD.reject(err);
    this.cancelStream(err);
  }

  protected onMessage(msg: Message): boolean {
    switch (msg.type) {
      case FrameType.DONE: {
        if (!this.eofSent) return false;
        const done = parseDone(msg);
        this.finish();
        if (done.size !== this.sent) {
          this.doneD.reject(
            new Error(`write of ${this.path}: sent ${this.sent} bytes but the agent wrote ${done.size}`),
          );
        } else {
          this.doneD.resolve(done);
        }
        return true;
      }
      case FrameType.ERROR: {
        const e = parseError(msg);
        const err = new AgentError(e.code, e.message, `write ${this.path}`);
        this.finish(err);
        this.doneD.reject(err);
        return true;
      }
      default:
        return false;
    }
  }

  protected onAbort(err: Error): void {
    this.doneD.reject(err);
  }
}

class ConfigureStream extends StreamBase {
  readonly what = 'configure';
  private readonly doneD = deferred<void>();
  private timer: NodeJS.Timeout | null = null;

  constructor(id: number, conn: ConnectionInternals, timeoutMs: number | undefined) {
    super(id, conn);
    if (timeoutMs !== undefined && timeoutMs > 0) {
      this.timer = setTimeout(
        () =>
          this.cancelStream(new AgentTimeoutError(`agent did not answer CONFIGURE within ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.timer.unref();
    }
  }

  get done(): Promise<void> {
    return this.doneD.promise;
  }

  protected onMessage(msg: Message): boolean {
    switch (msg.type) {
      case FrameType.DONE:
        this.stopTimer();
        this.finish();
        this.doneD.resolve();
        return true;
      case FrameType.ERROR: {
        const e = parseError(msg);
        const err = new AgentError(e.code, e.message, 'configure');
        this.stopTimer();
        this.finish(err);
        this.doneD.reject(err);
        return true;
      }
      default:
        return false;
    }
  }

  protected onAbort(err: Error): void {
    this.stopTimer();
    this.doneD.reject(err);
  }

  private stopTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}

// ---------------------------------------------------------------------------------------
// The connection

/** Known frame types the agent may send; a known host-only type from it is a protocol violation. */
const AGENT_TYPES: ReadonlySet<number> = new Set([
  FrameType.PONG,
  FrameType.HELLO,
  FrameType.UNSUPPORTED,
  FrameType.STARTED,
  FrameType.STDOUT,
  FrameType.STDERR,
  FrameType.EXIT,
  FrameType.ERROR,
  FrameType.CREDIT,
  FrameType.DATA,
  FrameType.DONE,
]);

export interface HandshakeOptions {
  timeoutMs: number;
  signal?: AbortSignal;
}

export class AgentConnection {
  /** Resolves when the connection is closed: undefined after close()/poweroff(), else why. */
  readonly closed: Promise<Error | undefined>;
  private readonly socket: Duplex;
  private readonly decoder = new FrameDecoder();
  private readonly streams = new Map<number, StreamBase>();
  private readonly pings = new Map<string, Deferred<void>>();
  private readonly handshakeNonce: string | null;
  private readonly internals: ConnectionInternals;
  private resolveClosed!: (err: Error | undefined) => void;
  private nextId = 1;
  private ignored = 0;
  private unknown = 0;
  /** Types already answered with UNSUPPORTED: one answer each bounds what a flood makes us write. */
  private readonly answeredTypes = new Set<number>();
  /** The agent's HELLO, while the handshake waits for it (undefined: none, or handshake over). */
  private peerHello: HelloInfo | undefined;
  private negotiating = false;
  private agentFeatures: AgentFeatures = featuresOf(1, LEGACY_FEATURES);
  private closeReason: Error | undefined;
  private isClosed = false;
  private poweringOff = false;
  private drainWaiters: Deferred<void>[] = [];

  /**
   * Takes over a socket on which the handshake is done; `rest` holds the bytes that
   * followed the PONG. Use connectAgent() or AgentConnection.handshake() to get one.
   */
  constructor(socket: Duplex, rest: Buffer = Buffer.alloc(0), handshakeNonce?: Buffer) {
    this.socket = socket;
    this.handshakeNonce = handshakeNonce ? handshakeNonce.toString('hex') : null;
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.internals = {
      send: (frame) => this.send(frame),
      sendData: (frame) => this.sendData(frame),
      fatal: (err) => this.destroy(err),
      forget: (stream) => {
        if (this.streams.get(stream.id) === stream) this.streams.delete(stream.id);
      },
    };
    socket.on('data', (chunk: Buffer | string) =>
      this.onData(typeof chunk === 'string' ? Buffer.from(chunk) : chunk),
    );
    socket.on('error', (err: Error) => this.destroy(err));
    socket.on('end', () => this.destroy(this.peerGone()));
    socket.on('close', () => this.destroy(this.peerGone()));
    socket.on('drain', () => this.wakeDrain());
    if (rest.length > 0) this.onData(rest);
    if (socket.destroyed) this.destroy(this.peerGone());
  }

  /**
   * Runs the PING/PONG handshake on a connected socket: sends PING with a random 16-byte
   * nonce (repeated every second) and discards everything until the exact PONG frame.
   */
  static handshake(socket: Duplex, opts: HandshakeOptions): Promise<AgentConnection> {
    return new Promise<AgentConnection>((resolve, reject) => {
      const deadline = performance.now() + opts.timeoutMs;
      const nonce = randomBytes(16);
      const ping = encodePing(nonce);
      const scanner = new SequenceScanner(encodeFrame(FrameType.PONG, 0, nonce));
      let settled = false;
      const cleanup = (): void => {
        settled = true;
        clearTimeout(timer);
        clearInterval(reping);
        socket.off('data', onData);
        socket.off('error', onError);
        socket.off('close', onClose);
        opts.signal?.removeEventListener('abort', onAbort);
      };
      const fail = (err: Error): void => {
        if (settled) return;
        cleanup();
        socket.destroy();
        reject(err);
      };
      const onData = (chunk: Buffer | string): void => {
        if (settled) return;
        const rest = scanner.push(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
        if (rest === null) return;
        cleanup();
        // Same tick: the connection's own listener is attached before any other chunk.
        const conn = new AgentConnection(socket, rest, nonce);
        conn.negotiate(Math.max(1, deadline - performance.now())).then(
          () => resolve(conn),
          (err: unknown) => {
            conn.close();
            reject(new Error(`agent handshake failed: ${toError(err).message}`, { cause: err }));
          },
        );
      };
      const onError = (err: Error): void =>
        fail(new Error(`agent handshake failed: ${err.message}`, { cause: err }));
      const onClose = (): void => fail(new Error('agent handshake failed: the socket closed before PONG'));
      const onAbort = (): void => fail(toError(opts.signal?.reason ?? new Error('aborted')));
      const timer = setTimeout(
        () =>
          fail(
            new AgentTimeoutError(
              `agent did not answer PING within ${opts.timeoutMs} ms (${scanner.discarded} stray bytes discarded)`,
            ),
          ),
        opts.timeoutMs,
      );
      const reping = setInterval(() => {
        if (!settled && !socket.destroyed) socket.write(ping);
      }, HANDSHAKE_REPING_MS);
      socket.on('data', onData);
      socket.on('error', onError);
      socket.on('close', onClose);
      if (opts.signal?.aborted) {
        onAbort();
        return;
      }
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      if (socket.destroyed) {
        onClose();
        return;
      }
      socket.write(ping);
    });
  }

  get stats(): ConnectionStats {
    return { openStreams: this.streams.size, ignoredFrames: this.ignored, unknownFrames: this.unknown };
  }

  /** The agent's protocol version and features, as announced in the handshake. */
  get features(): AgentFeatures {
    return this.agentFeatures;
  }

  /** Whether the agent announced `feature` (a version-1 agent: LEGACY_FEATURES). */
  supports(feature: FeatureName): boolean {
    return this.agentFeatures.names.has(feature);
  }

  /**
   * The second half of the handshake: HELLO, then a PING that fences the answer. A version-2
   * agent answers HELLO with its own before the PONG; a version-1 agent takes HELLO for a host
   * error, drops it and resynchronises on the PING, so the PONG comes with no HELLO before it.
   * Either way the PONG settles it without a timeout guess.
   */
  private async negotiate(timeoutMs: number): Promise<void> {
    this.negotiating = true;
    try {
      const fence = this.pingFrame(timeoutMs, 'HELLO');
      this.send(Buffer.concat([encodeHello(PROTOCOL_VERSION, ALL_FEATURES), fence.frame]));
      await fence.answered;
      const hello = this.peerHello;
      if (hello) this.agentFeatures = featuresOf(hello.version, hello.features);
    } finally {
      this.negotiating = false;
      this.peerHello = undefined;
    }
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  /** Round trip of a PING, in milliseconds. */
  async ping(timeoutMs: number): Promise<number> {
    const p = this.pingFrame(timeoutMs, 'PING');
    const t0 = performance.now();
    this.send(p.frame);
    await p.answered;
    return performance.now() - t0;
  }

  /** A PING frame to send and the promise of its PONG (rejected after timeoutMs). */
  private pingFrame(timeoutMs: number, what: string): { frame: Buffer; answered: Promise<void> } {
    this.ensureOpen();
    const nonce = randomBytes(16);
    const key = nonce.toString('hex');
    const d = deferred<void>();
    this.pings.set(key, d);
    const timer = setTimeout(() => {
      this.pings.delete(key);
      d.reject(new AgentTimeoutError(`agent did not answer ${what} within ${timeoutMs} ms`));
    }, timeoutMs);
    timer.unref();
    const answered = d.promise.finally(() => clearTimeout(timer));
    answered.catch(noop);
    return { frame: encodePing(nonce), answered };
  }

  exec(req: ExecRequest): ExecHandle {
    const id = this.allocId();
    const frame = encodeExec(id, req); // throws on a bad request, before anything exists
    const stream = new ExecStream(id, this.internals, req);
    this.register(stream, frame);
    return stream;
  }

  /** Runs a command to completion, keeping at most maxOutputBytes of each output stream. */
  async execCollect(
    req: ExecRequest,
    opts: { stdin?: Buffer | string; maxOutputBytes: number },
  ): Promise<ExecCollectResult> {
    const r = await this.execBuffered(req, opts);
    return { ...r, stdout: r.stdout.concat(), stderr: r.stderr.concat() };
  }

  /**
   * Runs a command to completion, keeping the start of each output stream: at most
   * maxOutputBytes, and only what `allowance` grants (bytes kept are taken from it; on success
   * the caller gives them back, on failure this does). Past either, the rest of that stream is
   * dropped and `truncated` set: what is kept is always a prefix.
   */
  async execBuffered(
    req: ExecRequest,
    opts: { stdin?: Buffer | string; maxOutputBytes: number; allowance?: ByteAllowance },
  ): Promise<ExecResult & { stdout: OutputChunks; stderr: OutputChunks; truncated: boolean }> {
    const h = this.exec({ ...req, stdin: req.stdin === true || opts.stdin !== undefined });
    let truncated = false;
    const collect = (r: Readable): { kept: OutputChunks; ended: Promise<void> } => {
      const kept = new OutputChunks();
      let full = false;
      r.on('data', (chunk: Buffer) => {
        if (full) return;
        const want = Math.min(chunk.length, opts.maxOutputBytes - kept.bytes);
        const granted = opts.allowance ? opts.allowance.take(want) : want;
        if (granted < chunk.length) {
          truncated = true;
          full = true;
        }
        if (granted > 0) kept.push(granted < chunk.length ? chunk.subarray(0, granted) : chunk);
      });
      const ended = new Promise<void>((resolve) => {
        r.on('end', resolve);
        r.on('close', resolve);
        r.on('error', () => resolve());
      });
      return { kept, ended };
    };
    const out = collect(h.stdout);
    const err = collect(h.stderr);
    if (opts.stdin !== undefined) {
      // A child may exit without reading its input: that is not an error of the exec.
      h.write(opts.stdin)
        .then(() => h.end())
        .catch(noop);
    } else if (req.stdin) {
      h.end().catch(noop);
    }
    try {
      const result = await h.result;
      await Promise.all([out.ended, err.ended]);
      return { ...result, stdout: out.kept, stderr: err.kept, truncated };
    } catch (e) {
      opts.allowance?.release(out.kept.bytes + err.kept.bytes);
      throw e;
    }
  }

  /** Writes a file atomically (temporary file + rename in the guest). */
  async writeFile(
    path: string,
    data: Buffer | Readable,
    opts: { mode?: number; mkdirs?: boolean } = {},
  ): Promise<{ size: number }> {
    checkAbsolute(path);
    const stream = new FileWriteStream(this.allocId(), this.internals, path);
    this.register(stream, encodeFileWrite(stream.id, path, opts));
    try {
      if (Buffer.isBuffer(data)) {
        await stream.send(data);
      } else {
        for await (const chunk of data as AsyncIterable<unknown>) {
          if (typeof chunk === 'string') await stream.send(Buffer.from(chunk, 'utf8'));
          else if (chunk instanceof Uint8Array)
            await stream.send(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length));
          else throw new TypeError('writeFile: the source stream must yield Buffers or strings');
        }
      }
      stream.sendEof();
    } catch (err) {
      const e = stream.failure ?? toError(err);
      stream.giveUp(e);
      throw e;
    }
    const done = await stream.done;
    return { size: done.size };
  }

  readFile(path: string): ReadFileHandle {
    checkAbsolute(path);
    const stream = new FileReadStream(this.allocId(), this.internals, path);
    this.register(stream, encodeFileRead(stream.id, path));
    return stream;
  }

  /**
   * Configures the guest after a boot or a restore: its root filesystem's size, its volumes
   * and its own identity (hostname, machine id, fresh kernel randomness, the current time).
   * Volumes need an agent with configure-volumes (else EOPNOTSUPP, before anything is sent).
   * Resolves once the agent has applied everything;
   * rejects with AgentError (EINVAL for a bad or repeated value, else the errno of the first
   * step that failed, earlier steps staying applied), with AgentTimeoutError after timeoutMs
   * (absent or 0: no host timeout), or with AgentClosedError. An agent that is not the
   * guest's init (--connect in tests) validates the request and applies nothing.
   */
  async configure(opts: ConfigureOptions, timeoutMs?: number): Promise<void> {
    if (timeoutMs !== undefined && !(Number.isFinite(timeoutMs) && timeoutMs >= 0)) {
      throw new RangeError(`timeoutMs must be a non-negative number, got ${timeoutMs}`);
    }
    if (opts.volumes?.length && !this.supports('configure-volumes')) {
      // An agent without the feature would skip the field and answer DONE: refuse instead.
      throw new AgentError(
        'EOPNOTSUPP',
        `protocol ${this.agentFeatures.version} agent cannot mount volumes at CONFIGURE`,
        'configure',
      );
    }
    const req = { ...opts };
    // A version-1 agent grows / at every CONFIGURE anyway; the field is for agents that ask.
    if (!this.supports('configure-grow-root')) delete req.growRoot;
    const id = this.allocId();
    const frame = encodeConfigure(id, req); // throws on a request that cannot be encoded
    const stream = new ConfigureStream(id, this.internals, timeoutMs);
    this.register(stream, frame);
    await stream.done;
  }

  /**
   * Tells the agent that this connection starts afresh: streams of any earlier host (the
   * machine was restored, branched, or its daemon restarted) are killed and their queued
   * output dropped. Send it right after connecting, before opening streams.
   */
  reset(): Promise<void> {
    this.ensureOpen();
    return new Promise<void>((resolve, reject) => {
      this.socket.write(encodeFrame(FrameType.RESET, 0), (err) => (err ? reject(err) : resolve()));
    });
  }

  /** Asks the agent to sync and power off; the connection then ends (closed → undefined). */
  poweroff(): Promise<void> {
    this.ensureOpen();
    this.poweringOff = true;
    return new Promise<void>((resolve, reject) => {
      this.socket.write(encodeFrame(FrameType.POWEROFF, 0), (err) => (err ? reject(err) : resolve()));
    });
  }

  /** Closes the connection; every pending operation rejects with AgentClosedError. */
  close(): void {
    this.destroy(undefined);
  }

  // -------------------------------------------------------------------------------------

  private peerGone(): Error | undefined {
    return this.poweringOff ? undefined : new Error('the agent closed the connection');
  }

  private ensureOpen(): void {
    if (this.isClosed) throw new AgentClosedError(this.closeReason);
  }

  private allocId(): number {
    this.ensureOpen();
    if (this.nextId > MAX_STREAM_ID) throw new Error('stream ids exhausted on this connection');
    return this.nextId++;
  }

  private register(stream: StreamBase, openFrame: Buffer): void {
    this.streams.set(stream.id, stream);
    this.send(openFrame);
  }

  private send(frame: Buffer): void {
    if (this.isClosed || this.socket.destroyed) return;
    this.socket.write(frame);
  }

  /** Writes a data frame, then waits while the socket's own buffer is full. */
  private async sendData(frame: Buffer): Promise<void> {
    if (this.isClosed) throw new AgentClosedError(this.closeReason);
    if (this.socket.write(frame)) return;
    const d = deferred<void>();
    this.drainWaiters.push(d);
    await d.promise;
  }

  private wakeDrain(): void {
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of waiters) w.resolve();
  }

  private onData(chunk: Buffer): void {
    if (this.isClosed) return;
    try {
      this.decoder.feed(chunk, (frame) => {
        if (!this.isClosed) this.onFrame(frame);
      });
    } catch (err) {
      // Only ProtocolErrors come from guest bytes; anything else is a host bug, but it must
      // not escape into the socket's event emitter either.
      this.destroy(
        err instanceof ProtocolError
          ? err
          : new Error(`agent frame handling failed: ${toError(err).message}`),
      );
    }
  }

  private onFrame(frame: Frame): void {
    if (!isKnownFrameType(frame.type)) {
      this.unknownFrame(frame);
      return;
    }
    if (!AGENT_TYPES.has(frame.type)) {
      throw new ProtocolError('unexpected', `the agent sent ${frameTypeName(frame.type)}, a host-only frame`);
    }
    const msg = decodeMessage(frame);
    if (msg.type === FrameType.HELLO || msg.type === FrameType.UNSUPPORTED) {
      if (msg.stream !== 0) throw new ProtocolError('unexpected', `${msg.name} on stream ${msg.stream}`);
      if (msg.type === FrameType.HELLO) this.onHello(parseHello(msg));
      else this.onUnsupported(parseUnsupported(msg));
      return;
    }
    if (msg.type === FrameType.PONG && msg.stream === 0) {
      const f = msg.fields[0];
      const key = f?.kind === 'bytes' ? f.value.toString('hex') : '';
      const d = this.pings.get(key);
      if (d) {
        this.pings.delete(key);
        d.resolve();
        return;
      }
      if (key === this.handshakeNonce) return; // an answer to a repeated handshake PING
      this.ignore();
      return;
    }
    const stream = msg.stream === 0 ? undefined : this.streams.get(msg.stream);
    if (stream === undefined) {
      this.ignore();
      return;
    }
    stream.handle(msg);
  }

  /**
   * A frame of a type this host does not know (a newer agent's): skipped whole, counted
   * against the same budget as frames for unknown streams, and answered once per type so that
   * a flood of them cannot make the host queue writes to a guest that does not read.
   */
  private unknownFrame(frame: Frame): void {
    this.unknown++;
    if (!this.answeredTypes.has(frame.type)) {
      this.answeredTypes.add(frame.type);
      this.send(encodeUnsupported(frame.type, frame.stream));
    }
    this.ignore();
  }

  /** Only the handshake's HELLO counts; a later one changes nothing. */
  private onHello(hello: HelloInfo): void {
    if (this.negotiating && this.peerHello === undefined) this.peerHello = hello;
    else this.ignore();
  }

  /**
   * The agent did not know a frame this host sent. The operation on that stream (if any)
   * fails with EOPNOTSUPP; the connection goes on.
   */
  private onUnsupported(u: UnsupportedInfo): void {
    const stream = u.stream === 0 ? undefined : this.streams.get(u.stream);
    if (stream === undefined) {
      this.ignore();
      return;
    }
    const name = frameTypeName(u.type) ?? `0x${u.type.toString(16).padStart(2, '0')}`;
    stream.abort(new AgentError('EOPNOTSUPP', `the agent does not support ${name} frames`, stream.what));
  }

  private ignore(): void {
    this.ignored++;
    if (this.ignored > MAX_IGNORED_FRAMES) {
      throw new ProtocolError(
        'unknown-stream',
        `more than ${MAX_IGNORED_FRAMES} frames for unknown or finished streams`,
      );
    }
  }

  private destroy(reason: Error | undefined): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closeReason = reason;
    this.socket.destroy();
    const err = new AgentClosedError(reason);
    for (const s of [...this.streams.values()]) s.abort(err);
    this.streams.clear();
    for (const p of this.pings.values()) p.reject(err);
    this.pings.clear();
    for (const w of this.drainWaiters) w.reject(err);
    this.drainWaiters = [];
    this.resolveClosed(reason);
  }
}

function featuresOf(version: number, bits: bigint): AgentFeatures {
  return { version, bits, names: new Set(featureNames(bits)) };
}

/**
 * Connects to the agent's Unix socket (QEMU's chardev server socket), retrying while it
 * does not exist or refuses connections, and completes the PING/PONG handshake, all within
 * timeoutMs.
 */
export async function connectAgent(
  socketPath: string,
  opts: { timeoutMs: number; signal?: AbortSignal },
): Promise<AgentConnection> {
  const deadline = performance.now() + opts.timeoutMs;
  let lastErr: Error | undefined;
  for (;;) {
    opts.signal?.throwIfAborted();
    const remaining = deadline - performance.now();
    if (remaining <= 0) {
      throw new AgentTimeoutError(
        `could not connect to ${socketPath} within ${opts.timeoutMs} ms${lastErr ? `: ${lastErr.message}` : ''}`,
      );
    }
    let socket: net.Socket;
    try {
      socket = await connectOnce(socketPath, remaining, opts.signal);
    } catch (err) {
      const e = toError(err);
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ECONNREFUSED' && code !== 'EAGAIN' && code !== 'ETIMEDOUT') throw e;
      lastErr = e;
      await sleep(Math.min(20, Math.max(0, deadline - performance.now())), opts.signal);
      continue;
    }
    const handshakeOpts: HandshakeOptions = { timeoutMs: Math.max(1, deadline - performance.now()) };
    if (opts.signal) handshakeOpts.signal = opts.signal;
    return AgentConnection.handshake(socket, handshakeOpts);
  }
}

function connectOnce(socketPath: string, timeoutMs: number, signal?: AbortSignal): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path: socketPath });
    const done = (err?: Error): void => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('error', onError);
      signal?.removeEventListener('abort', onAbort);
      if (err) {
        socket.destroy();
        reject(err);
      } else {
        // Until the handshake attaches its listeners, an error must not go unheard.
        socket.on('error', noop);
        resolve(socket);
      }
    };
    const onConnect = (): void => done();
    const onError = (err: Error): void => done(err);
    const onAbort = (): void => done(toError(signal?.reason ?? new Error('aborted')));
    const timer = setTimeout(() => {
      const e: NodeJS.ErrnoException = new Error(`connect to ${socketPath} timed out`);
      e.code = 'ETIMEDOUT';
      done(e);
    }, timeoutMs);
    socket.once('connect', onConnect);
    socket.once('error', onError);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(toError(signal.reason));
      return;
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(toError(signal?.reason));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
