// Forwarded ports (docs/agent-protocol.md, "Port forwarding"): the host opens a stream with
// PORT_OPEN, the agent connects to the port on the guest's loopback and answers PORT_OPEN
// (connected) or ERROR (ECONNREFUSED …). From then on it is a socket's bytes both ways, with
// the guest API streams' Duplex, windows and half-close (socket-stream.ts).

import type { Duplex } from 'node:stream';
import { type ConnectionInternals, deferred } from './agent-streams.js';
import { AgentError, AgentTimeoutError } from './agent-types.js';
import { FrameType, type Message } from './protocol.js';
import { parseError } from './protocol-messages.js';
import { SocketStream } from './socket-stream.js';

/** The agent's own connect timeout is 10 s; past this the host stops waiting for its answer. */
export const PORT_OPEN_TIMEOUT_MS = 15_000;

export class PortStream extends SocketStream {
  readonly what = 'port';
  private opening = true;
  private readonly openedD = deferred<Duplex>();
  private timer: NodeJS.Timeout | null;

  constructor(
    id: number,
    conn: ConnectionInternals,
    readonly port: number,
  ) {
    super(id, conn, { drainAfterEnd: false });
    this.timer = setTimeout(
      () =>
        this.cancelStream(
          new AgentTimeoutError(`agent did not answer PORT_OPEN ${port} within ${PORT_OPEN_TIMEOUT_MS} ms`),
        ),
      PORT_OPEN_TIMEOUT_MS,
    );
    this.timer.unref();
  }

  /** The Duplex once the agent is connected; rejects with its AgentError (ECONNREFUSED …). */
  get opened(): Promise<Duplex> {
    return this.openedD.promise;
  }

  protected override onMessage(msg: Message): boolean {
    if (!this.opening) return msg.type !== FrameType.PORT_OPEN && super.onMessage(msg);
    switch (msg.type) {
      case FrameType.PORT_OPEN:
        this.opening = false;
        this.stopTimer();
        this.openedD.resolve(this.duplex);
        return true;
      case FrameType.ERROR: {
        const e = parseError(msg);
        const err = new AgentError(e.code, e.message, `port ${this.port}`);
        this.stopTimer();
        this.finish(err);
        this.closeDuplex();
        this.openedD.reject(err);
        return true;
      }
      default:
        // Nothing but the answer may come before the answer.
        return false;
    }
  }

  protected peerFailed(err: AgentError): void {
    this.closeDuplex(err);
  }

  protected onAbort(err: Error): void {
    this.stopTimer();
    if (this.opening) {
      this.closeDuplex();
      this.openedD.reject(err);
    } else {
      this.closeDuplex(err);
    }
  }

  private stopTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}
