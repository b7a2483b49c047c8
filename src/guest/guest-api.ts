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

import type { Duplex } from 'node:stream';
import type { ConnectionInternals } from './agent-streams.js';
import { SocketStream } from './socket-stream.js';

/** Set in the id of every stream the agent opens, never in the host's. */
export const AGENT_STREAM_BIT = 0x80000000;
/** Guest API streams open at once on one connection (the agent opens no more either). */
export const MAX_GUEST_API_STREAMS = 16;

/** Takes a guest's API connection: serve it, or destroy it to refuse. */
export type GuestApiHandler = (stream: Duplex) => void;

export function isAgentStreamId(id: number): boolean {
  return id >= AGENT_STREAM_BIT;
}

export class GuestApiStream extends SocketStream {
  readonly what = 'guest-api';

  constructor(id: number, conn: ConnectionInternals) {
    super(id, conn, { drainAfterEnd: true });
  }

  protected peerFailed(): void {
    // Without an error: the HTTP server sees a connection that closed, which it is.
    this.closeDuplex();
  }

  protected onAbort(): void {
    this.closeDuplex();
  }
}
