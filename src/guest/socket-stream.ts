// A stream that is a socket's bytes both ways (docs/agent-protocol.md, "Guest API" and "Port
// forwarding"): DATA under the stream windows, an empty DATA ending each direction on its own,
// ERROR or CANCEL ending both. Guest API connections (the agent opens them) and forwarded ports
// (the host opens them) differ only in how they open and what a consumer that goes away means,
// so the Duplex and its backpressure are written once, here.

import { Duplex } from 'node:stream';
import { type ConnectionInternals, StreamBase } from './agent-streams.js';
import { AgentCancelledError, AgentError } from './agent-types.js';
import { encodeFrame, FrameType, type Message } from './protocol.js';
import { parseError } from './protocol-messages.js';

export interface SocketStreamOptions {
  /**
   * When the consumer destroys the Duplex after ending its side: true waits for the guest's
   * end, dropping what it sends (the guest API: an HTTP server destroys its socket once the
   * answer is written, and the agent is still handing the guest the rest); false cancels.
   */
  drainAfterEnd: boolean;
}

export abstract class SocketStream extends StreamBase {
  readonly duplex: Duplex;
  /** The agent's bytes not yet taken by the Duplex (at most the window: it reopens as they go). */
  private readonly queue: Buffer[] = [];
  private wanting = false;
  private eofSent = false;
  private eofReceived = false;
  /** The consumer is gone after our end was sent: the agent's bytes are credited and dropped. */
  private draining = false;
  /** Bytes of the agent's DATA taken so far. */
  protected received = 0;

  constructor(
    id: number,
    conn: ConnectionInternals,
    private readonly opts: SocketStreamOptions,
  ) {
    super(id, conn);
    this.duplex = new Duplex({
      // Each direction ends on its own (an empty DATA each way), like a socket's halves.
      allowHalfOpen: true,
      read: () => {
        this.wanting = true;
        this.pump();
      },
      write: (chunk: Buffer, _enc, cb) => {
        this.sendPayload(FrameType.DATA, chunk).then(
          () => cb(),
          (e: unknown) => cb(e as Error),
        );
      },
      final: (cb) => {
        this.sendEof();
        cb();
      },
      destroy: (err, cb) => {
        this.consumerGone();
        cb(err);
      },
    });
    // What a net.Socket counts: the HTTP server's request guard sees a body still arriving by it.
    Object.defineProperty(this.duplex, 'bytesRead', { get: () => this.received });
  }

  /** Open and not cancelled. */
  get live(): boolean {
    return !this.finished && !this.cancelled;
  }

  /**
   * Moves queued bytes into the Duplex while it wants more, crediting them as they go (as
   * InboundChannel does): the agent can have at most its window queued here plus what the
   * Duplex buffers, however slowly the consumer reads.
   */
  private pump(): void {
    while (this.wanting && this.queue.length > 0 && !this.duplex.destroyed) {
      const chunk = this.queue.shift() as Buffer;
      this.grant(chunk.length, this.queue.length === 0);
      this.wanting = this.duplex.push(chunk);
    }
    if (this.eofReceived && this.queue.length === 0 && !this.draining && !this.duplex.destroyed)
      this.duplex.push(null);
  }

  private sendEof(): void {
    if (this.eofSent || this.finished || this.cancelled) return;
    this.eofSent = true;
    this.conn.send(encodeFrame(FrameType.DATA, this.id));
    this.maybeDone();
  }

  private maybeDone(): void {
    if (this.eofSent && this.eofReceived) this.finish();
  }

  private consumerGone(): void {
    if (this.finished || this.cancelled) return;
    if (this.eofSent && this.opts.drainAfterEnd) {
      this.draining = true;
      const queued = this.queue.splice(0).reduce((n, b) => n + b.length, 0);
      if (queued > 0) this.grant(queued, true);
      return;
    }
    this.cancelStream(new AgentCancelledError(`${this.what} stream ${this.id} closed by the host`));
  }

  /** DATA both ways and ERROR, once the stream is open. */
  protected onMessage(msg: Message): boolean {
    switch (msg.type) {
      case FrameType.DATA: {
        if (this.eofReceived) return false;
        const data = msg.fields[0]?.kind === 'bytes' ? msg.fields[0].value : Buffer.alloc(0);
        if (data.length === 0) {
          this.eofReceived = true;
          this.pump();
          this.maybeDone();
          return true;
        }
        if (!this.takeWindow(data.length, 'DATA')) return true;
        if (this.draining || this.duplex.destroyed) {
          this.grant(data.length, true);
          return true;
        }
        this.received += data.length;
        // Copy: `data` is a view into a socket chunk that must not be retained.
        this.queue.push(Buffer.from(data));
        this.pump();
        return true;
      }
      case FrameType.ERROR: {
        // The guest's socket failed: nothing more will come or go.
        const e = parseError(msg);
        const err = new AgentError(e.code, e.message, this.what);
        this.finish(err);
        this.peerFailed(err);
        return true;
      }
      default:
        return false;
    }
  }

  /** The guest's side failed (ERROR) after the stream was open. */
  protected abstract peerFailed(err: AgentError): void;

  /** Ends the Duplex: with `err` only if someone listens for it (else it would be uncaught). */
  protected closeDuplex(err?: Error): void {
    if (this.duplex.destroyed) return;
    if (err && this.duplex.listenerCount('error') > 0) this.duplex.destroy(err);
    else this.duplex.destroy();
  }
}
