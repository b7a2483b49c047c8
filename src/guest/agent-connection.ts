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
import type { Duplex, Readable } from 'node:stream';
import { HutchError } from '../errors.js';
import {
  type ConnectionInternals,
  checkAbsolute,
  type Deferred,
  deferred,
  ExecStream,
  FileReadStream,
  FileWriteStream,
  HANDSHAKE_FIRST_REPING_MS,
  HANDSHAKE_REPING_MS,
  MAX_IGNORED_FRAMES,
  noop,
  RequestStream,
  type StreamBase,
  toError,
} from './agent-streams.js';
import {
  AgentClosedError,
  AgentError,
  type AgentFeatures,
  AgentTimeoutError,
  type ByteAllowance,
  type ConfigureOptions,
  type ConnectionStats,
  type ExecCollectResult,
  type ExecHandle,
  type ExecRequest,
  type ExecResult,
  type ReadFileHandle,
} from './agent-types.js';
import {
  AGENT_STREAM_BIT,
  type GuestApiHandler,
  GuestApiStream,
  isAgentStreamId,
  MAX_GUEST_API_STREAMS,
} from './guest-api.js';
import { OutputChunks } from './output-chunks.js';
import { PortStream } from './port-stream.js';
import {
  ALL_FEATURES,
  decodeMessage,
  encodeFrame,
  type FeatureName,
  type Frame,
  FrameDecoder,
  FrameType,
  featureNames,
  frameTypeName,
  isKnownFrameType,
  LEGACY_FEATURES,
  MAX_STREAM_ID,
  type Message,
  PROTOCOL_VERSION,
  ProtocolError,
  SequenceScanner,
} from './protocol.js';
import {
  encodeConfigure,
  encodeDiskMount,
  encodeDiskUnmount,
  encodeExec,
  encodeFileRead,
  encodeFileWrite,
  encodeHello,
  encodePing,
  encodePortOpen,
  encodeUnsupported,
  type HelloInfo,
  parseDone,
  parseHello,
  parseUnsupported,
  type UnsupportedInfo,
} from './protocol-messages.js';

export { MAX_IGNORED_FRAMES } from './agent-streams.js';
export * from './agent-types.js';

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
  FrameType.API_OPEN,
  FrameType.PORT_OPEN,
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
  /** Who takes the guest's API connections; none: they are refused. */
  private guestApi: GuestApiHandler | undefined;

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
   * nonce (repeated, soon at first, then every second) and discards everything until the exact PONG frame.
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
        clearTimeout(reping);
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
      // A PING written while the guest's port is still closed (just after a restore) is lost:
      // repeat it soon, then less and less often, so a lost one costs milliseconds, not a second.
      let every = HANDSHAKE_FIRST_REPING_MS;
      const again = (): void => {
        if (settled || socket.destroyed) return;
        socket.write(ping);
        every = Math.min(every * 2, HANDSHAKE_REPING_MS);
        reping = setTimeout(again, every);
      };
      let reping = setTimeout(again, every);
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

  /**
   * Serves the guest's API connections (API_OPEN) with `handler`, from now on; undefined
   * refuses them again. Streams already open are not affected.
   */
  serveGuestApi(handler: GuestApiHandler | undefined): void {
    this.guestApi = handler;
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
    opts: {
      stdin?: Buffer | string;
      maxOutputBytes: number;
      allowance?: ByteAllowance;
      /** Aborted: the command is killed (its result says so: no exit code, signal 9). */
      signal?: AbortSignal | undefined;
    },
  ): Promise<ExecResult & { stdout: OutputChunks; stderr: OutputChunks; truncated: boolean }> {
    const h = this.exec({ ...req, stdin: req.stdin === true || opts.stdin !== undefined });
    // SIGKILL to its process group, not a cancel of the stream: the result still comes (signal 9)
    // with the output so far.
    const kill = (): void => h.signal(9);
    if (opts.signal?.aborted) kill();
    else opts.signal?.addEventListener('abort', kill, { once: true });
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
    } finally {
      opts.signal?.removeEventListener('abort', kill);
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
    if (opts.net !== undefined && !this.supports('net')) {
      // Skipped unknown, the field would leave the guest without a network and say DONE.
      throw new AgentError(
        'EOPNOTSUPP',
        `this machine's agent (protocol ${this.agentFeatures.version}) cannot configure a network`,
        'configure',
      );
    }
    const req = { ...opts };
    // A version-1 agent grows / at every CONFIGURE anyway; the field is for agents that ask.
    if (!this.supports('configure-grow-root')) delete req.growRoot;
    const id = this.allocId();
    const frame = encodeConfigure(id, req); // throws on a request that cannot be encoded
    const stream = new RequestStream(id, this.internals, 'configure', 'CONFIGURE', timeoutMs);
    this.register(stream, frame);
    await stream.done;
  }

  /**
   * Mounts the ext4 disk the host has just hot-plugged at SCSI target `target` (0–255, LUN 0)
   * on `path` in the guest, read-only with `noload` (its journal is never replayed) when asked.
   * The agent waits up to 10 s for the guest kernel to find the disk. Resolves with the disk's
   * size; rejects with AgentError: ETIMEDOUT (no disk at the target), EBUSY (something is
   * mounted at `path`), ENOTDIR, EINVAL (a bad path or target), the mount's errno, EOPNOTSUPP
   * for an agent without `disks` (before anything is sent) or one that is not the guest's init;
   * AgentTimeoutError after timeoutMs (0: no host timeout), AgentClosedError.
   */
  async mountDisk(
    req: { target: number; path: string; readOnly: boolean },
    timeoutMs = 20_000,
  ): Promise<{ sizeBytes: number }> {
    const done = await this.diskRequest('disk mount', 'DISK_MOUNT', timeoutMs, (id) =>
      encodeDiskMount(id, req),
    );
    return { sizeBytes: parseDone(done).size };
  }

  /**
   * Unmounts the disk at SCSI target `target` from `path` (synced first) and has the guest
   * release the SCSI device, so the host may unplug it. Rejects with AgentError: EBUSY (files
   * are open under `path`: it stays mounted, unplug nothing), EINVAL (`path` is not a mount
   * point, or not that disk's), ENODEV (no disk at the target), EOPNOTSUPP as mountDisk;
   * AgentTimeoutError, AgentClosedError.
   */
  async unmountDisk(req: { target: number; path: string }, timeoutMs = 20_000): Promise<void> {
    await this.diskRequest('disk unmount', 'DISK_UNMOUNT', timeoutMs, (id) => encodeDiskUnmount(id, req));
  }

  private async diskRequest(
    what: string,
    frameName: string,
    timeoutMs: number,
    encode: (id: number) => Buffer,
  ): Promise<Message> {
    if (!(Number.isFinite(timeoutMs) && timeoutMs >= 0))
      throw new RangeError(`timeoutMs must be a non-negative number, got ${timeoutMs}`);
    if (!this.supports('disks')) {
      // An older agent would answer UNSUPPORTED; say why before anything is sent.
      throw new AgentError(
        'EOPNOTSUPP',
        `this machine's agent (protocol ${this.agentFeatures.version}) cannot attach disks`,
        what,
      );
    }
    const id = this.allocId();
    const frame = encode(id); // throws on a request that cannot be encoded
    const stream = new RequestStream(id, this.internals, what, frameName, timeoutMs);
    this.register(stream, frame);
    return stream.done;
  }

  /**
   * A connection to TCP `port` on the guest's loopback (127.0.0.1, else ::1), as a Duplex with
   * backpressure both ways: writes wait for the agent's window, and the agent reads the socket
   * only as fast as the Duplex is read. end() half-closes (the guest's server reads EOF), the
   * guest closing its side gives 'end', destroy() sends CANCEL (the agent closes the socket).
   * Rejects with HutchError PORT_NOT_LISTENING when nothing accepts on the port, RESOURCE_EXHAUSTED
   * when the agent has its maximum of forwarded connections open, NOT_SUPPORTED for an agent
   * without port-forward, AgentClosedError/AgentTimeoutError when the agent is gone.
   */
  async openPort(port: number): Promise<Duplex> {
    if (!Number.isInteger(port) || port < 1 || port > 0xffff)
      throw new HutchError('INVALID_ARGUMENT', `port must be an integer from 1 to 65535, got ${port}`);
    if (!this.supports('port-forward'))
      throw new HutchError(
        'NOT_SUPPORTED',
        `this machine's agent (protocol ${this.agentFeatures.version}) cannot forward ports; recreate the machine to get a newer one`,
      );
    const stream = new PortStream(this.allocId(), this.internals, port);
    this.register(stream, encodePortOpen(stream.id, port));
    try {
      return await stream.opened;
    } catch (e) {
      if (!(e instanceof AgentError)) throw e;
      const errno = { errno: e.code };
      if (e.code === 'EMFILE')
        throw new HutchError(
          'RESOURCE_EXHAUSTED',
          `too many connections to ports of the machine are open; close some first`,
          errno,
        );
      if (e.code === 'EOPNOTSUPP')
        throw new HutchError('NOT_SUPPORTED', `this machine's agent cannot forward ports`, errno);
      if (e.code === 'ECONNREFUSED')
        throw new HutchError('PORT_NOT_LISTENING', `nothing listens on port ${port} in the machine`, errno);
      throw new HutchError(
        'PORT_NOT_LISTENING',
        `cannot connect to port ${port} in the machine: ${e.code}${e.agentMessage ? ` (${e.agentMessage})` : ''}`,
        errno,
      );
    }
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
    // Ids with the top bit set are the agent's (guest-api.ts).
    if (this.nextId >= Math.min(AGENT_STREAM_BIT, MAX_STREAM_ID))
      throw new Error('stream ids exhausted on this connection');
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
    if (msg.type === FrameType.API_OPEN) {
      this.onApiOpen(msg.stream);
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

  /**
   * The agent opens a stream for a guest process's API connection. An id that is not the
   * agent's to choose, or one in use, breaks the protocol; past the limit, or with nobody to
   * serve it, the stream is refused (CANCEL) and the refusal counted like an ignored frame.
   */
  private onApiOpen(id: number): void {
    if (!isAgentStreamId(id))
      throw new ProtocolError('unexpected', `API_OPEN on stream ${id}, an id the host allocates`);
    if (this.streams.has(id)) throw new ProtocolError('unexpected', `API_OPEN reuses open stream ${id}`);
    let live = 0;
    for (const s of this.streams.values()) if (s instanceof GuestApiStream && s.live) live++;
    const handler = this.guestApi;
    if (!handler || live >= MAX_GUEST_API_STREAMS) {
      this.send(encodeFrame(FrameType.CANCEL, id));
      this.ignore();
      return;
    }
    const stream = new GuestApiStream(id, this.internals);
    this.streams.set(id, stream);
    try {
      handler(stream.duplex);
    } catch (e) {
      // The handler's failure is the host's bug, not the guest's: refuse this one stream.
      stream.cancelStream(toError(e));
    }
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
