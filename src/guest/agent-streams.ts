// The multiplexed streams of one agent connection: flow control (windows and CREDIT), exec,
// file read and write, CONFIGURE. Every buffer is bounded by the stream's receive window; the
// connection (agent-connection.ts) routes frames to them and owns the socket.

import { Readable } from 'node:stream';
import {
  AgentCancelledError,
  AgentError,
  AgentTimeoutError,
  type ExecHandle,
  type ExecRequest,
  type ExecResult,
  type ReadFileHandle,
  type StreamStats,
} from './agent-types.js';
import {
  encodeFrame,
  FrameType,
  INITIAL_WINDOW,
  MAX_PAYLOAD,
  type Message,
  ProtocolError,
} from './protocol.js';
import {
  encodeCredit,
  encodeResize,
  encodeSignal,
  fixedValue,
  parseDone,
  parseError,
  parseExit,
} from './protocol-messages.js';

// ---------------------------------------------------------------------------------------
// Limits

/** Frames for unknown or finished streams tolerated before the agent is deemed hostile. */
export const MAX_IGNORED_FRAMES = 4096;
/** Readable buffer of an output stream; bytes are credited when they move into it. */
export const READABLE_HWM = 65536;
/** Credit is batched up to this much (or sent when a queue drains). */
export const CREDIT_BATCH = 32768;
/** After CANCEL, how long the agent gets to finish the stream before the host forgets it. */
export const CANCEL_GRACE_MS = 5000;
/** Host-side backstop beyond an exec's own timeout. */
export const EXEC_TIMEOUT_GRACE_MS = 5000;
/** Payloads smaller than this are coalesced into shared buffers while queued. */
export const SMALL_CHUNK = 4096;
export const COALESCE_SIZE = 16384;
/** How often PING is repeated while waiting for the handshake PONG: first after this, doubling… */
export const HANDSHAKE_FIRST_REPING_MS = 20;
/** …up to this. */
export const HANDSHAKE_REPING_MS = 1000;

// ---------------------------------------------------------------------------------------
// Small helpers

export const noop = (): void => {};

export interface Deferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(err: Error): void;
  settled: boolean;
}

/** A promise that never counts as an unhandled rejection (callers still see the error). */
export function deferred<T>(): Deferred<T> {
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

export function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(noop);
  return p;
}

export function toError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

export function checkAbsolute(path: string): void {
  if (!path.startsWith('/')) throw new TypeError(`path must be absolute: ${JSON.stringify(path)}`);
}

/** Ends a stream we produce after a failure without risking an unhandled 'error' event. */
export function failReadable(r: Readable, err: Error): void {
  if (r.destroyed) return;
  if (r.listenerCount('error') > 0) r.destroy(err);
  else r.destroy();
}

// ---------------------------------------------------------------------------------------
// Inbound data: a bounded queue feeding a Readable, crediting the agent as it is consumed

export interface QueueItem {
  buf: Buffer;
  len: number;
  shared: boolean;
}

export class InboundChannel {
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

export interface ConnectionInternals {
  send(frame: Buffer): void;
  sendData(frame: Buffer): Promise<void>;
  fatal(err: ProtocolError): void;
  forget(stream: StreamBase): void;
}

export abstract class StreamBase {
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

export class ExecStream extends StreamBase implements ExecHandle {
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

export class FileReadStream extends StreamBase implements ReadFileHandle {
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

export class FileWriteStream extends StreamBase {
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

/**
 * A request the agent answers once, DONE or ERROR, with nothing in between: CONFIGURE,
 * DISK_MOUNT, DISK_UNMOUNT. `what` names it in errors (AgentError's context).
 */
export class RequestStream extends StreamBase {
  private readonly doneD = deferred<Message>();
  private timer: NodeJS.Timeout | null = null;

  constructor(
    id: number,
    conn: ConnectionInternals,
    readonly what: string,
    frameName: string,
    timeoutMs: number | undefined,
  ) {
    super(id, conn);
    if (timeoutMs !== undefined && timeoutMs > 0) {
      this.timer = setTimeout(
        () =>
          this.cancelStream(
            new AgentTimeoutError(`agent did not answer ${frameName} within ${timeoutMs} ms`),
          ),
        timeoutMs,
      );
      this.timer.unref();
    }
  }

  /** The DONE message (its fields are the request's to read), or the ERROR as AgentError. */
  get done(): Promise<Message> {
    return this.doneD.promise;
  }

  protected onMessage(msg: Message): boolean {
    switch (msg.type) {
      case FrameType.DONE:
        this.stopTimer();
        this.finish();
        this.doneD.resolve(msg);
        return true;
      case FrameType.ERROR: {
        const e = parseError(msg);
        const err = new AgentError(e.code, e.message, this.what);
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
