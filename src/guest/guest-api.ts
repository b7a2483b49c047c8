// Streams the agent opens (API_OPEN; docs/agent-protocol.md, "Guest API"): a process in the
// guest connected to the agent's API socket, tunnelled to the host. Each becomes a Duplex of
// HTTP bytes that the daemon serves its machines API on, acting for the machine's owner
// (src/daemon.ts), so the guest's `hutch` needs no key.
//
// The guest is hostile. It can only open streams of this one kind; their ids must have the top
// bit set (the host's never do, so the two cannot collide); at most MAX_GUEST_API_STREAMS are
// open at once (the rest are refused with CANCEL, and refusals count against the connection's
// budget of ignored frames, so a flood ends the connection); every byte it sends counts against
// the stream's window, which reopens only as the HTTP server reads.

import { Duplex } from 'node:stream';
import { type ConnectionInternals, StreamBase } from './agent-streams.js';
import { AgentCancelledError, AgentError } from './agent-types.js';
import { encodeFrame, FrameType, type Message } from './protocol.js';
import { parseError } from './protocol-messages.js';

/** Set in the id of every stream the agent opens, never in the host's. */
export const AGENT_STREAM_BIT = 0x80000000;
/** Guest API streams open at once on one connection (the agent opens no more either). */
export const MAX_GUEST_API_STREAMS = 16;

/** Takes a guest's API connection: serve it, or destroy it to refuse. */
export type GuestApiHandler = (stream: Duplex) => void;

export function isAgentStreamId(id: number): boolean {
  return id >= AGENT_STREAM_BIT;
}

export class GuestApiStream extends StreamBase {
  readonly what = 'guest-api';
  readonly duplex: Duplex;
  /** The agent's bytes not yet taken by the Duplex (at most the window: it reopens as they go). */
  private readonly queue: Buffer[] = [];
  private wanting = false;
  private eofSent = false;
  private eofReceived = false;
  /** The HTTP side is gone after our end was sent: the agent's bytes are credited and dropped. */
  private draining = false;

  constructor(id: number, conn: ConnectionInternals) {
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
        this.httpGone();
        cb(err);
      },
    });
    // What a net.Socket counts: the HTTP server's request guard sees a body still arriving by it.
    Object.defineProperty(this.duplex, 'bytesRead', { get: () => this.received });
  }

  /** Bytes of the agent's DATA taken so far. */
  private received = 0;

  /** Open and not cancelled: what the per-connection limit counts (the agent counts alike). */
  get live(): boolean {
    return !this.finished && !this.cancelled;
  }

  /**
   * Moves queued bytes into the Duplex while it wants more, crediting them as they go (as
   * InboundChannel does): the agent can have at most its window queued here plus what the
   * Duplex buffers, however slowly the HTTP server reads.
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

  private httpGone(): void {
    if (this.finished || this.cancelled) return;
    // After our end was sent the agent is still handing the guest the rest of the answer:
    // cancelling would cut it. Wait for the guest's end instead, dropping what it sends.
    if (this.eofSent) {
      this.draining = true;
      const queued = this.queue.splice(0).reduce((n, b) => n + b.length, 0);
      if (queued > 0) this.grant(queued, true);
      return;
    }
    this.cancelStream(new AgentCancelledError(`guest API stream ${this.id} closed by the host`));
  }

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
        // The guest's client went away: nothing more will come or go.
        const e = parseError(msg);
        this.finish(new AgentError(e.code, e.message, 'guest API'));
        this.closeDuplex();
        return true;
      }
      default:
        return false;
    }
  }

  protected onAbort(): void {
    this.closeDuplex();
  }

  private closeDuplex(): void {
    // Without an error: the HTTP server sees a connection that closed, which it is.
    if (!this.duplex.destroyed) this.duplex.destroy();
  }
}
