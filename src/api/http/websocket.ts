import type { IncomingMessage } from 'node:http';
import { type RawData, WebSocket } from 'ws';
import { HutchError } from '../../errors.js';
import { OutputChunks } from '../../guest/output-chunks.js';

/**
 * WebSocket plumbing shared by every API surface (machines, boxes): the handshake check, and
 * both halves of a channel bounded by what they hold. Upgrades are routed by the one server
 * (server.ts) like any other request.
 */

/** Close codes used by hutch's channels (1000–1015 are the standard ones). */
export const closeCodes = {
  normal: 1000,
  /** The machine went away (destroyed, suspended, failed) or the server is stopping. */
  goingAway: 1001,
  /** A frame the channel does not understand. */
  unsupported: 1003,
  /** The peer does not read fast enough to keep up with the output. */
  tryAgainLater: 1013,
  internal: 1011,
} as const;

const tokenList = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:[ \t]*,[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*$/;

/**
 * Refuses, with the error format, every upgrade request that `ws` would refuse itself. `ws`
 * answers those with a plain-text 400 and never calls back, so a handler that had already
 * started work for the socket (a shell, a session) would wait for it forever: check first.
 */
export function checkHandshake(req: IncomingMessage): void {
  const h = req.headers;
  if ((h.upgrade ?? '').toLowerCase() !== 'websocket')
    throw new HutchError('INVALID_ARGUMENT', 'only WebSocket upgrades are served (Upgrade: websocket)');
  if (!/^[+/0-9A-Za-z]{22}==$/.test(h['sec-websocket-key'] ?? ''))
    throw new HutchError('INVALID_ARGUMENT', 'missing or invalid Sec-WebSocket-Key header');
  const version = Number(h['sec-websocket-version']);
  if (version !== 13 && version !== 8)
    throw new HutchError('INVALID_ARGUMENT', 'missing or invalid Sec-WebSocket-Version header (13)');
  const protocols = h['sec-websocket-protocol'];
  if (protocols !== undefined) {
    const names = protocols.split(',').map((p) => p.trim());
    if (!tokenList.test(protocols) || new Set(names).size !== names.length)
      throw new HutchError('INVALID_ARGUMENT', 'invalid Sec-WebSocket-Protocol header');
  }
}

/**
 * What one frame queued for a peer costs beyond its payload: ws's header buffer and the socket's
 * write request, chunk and callback. Measured on Node 20 against a peer that does not read:
 * 650–850 bytes a frame whatever its size; rounded up, so the bound errs on the safe side. (A
 * console flood comes in reads of ~35 bytes: counted by payload alone, two never-reading viewers
 * "limited" to 4 MiB each grew the daemon by ~290 MiB in 90 s.)
 */
const frameOverhead = 1024;

/**
 * The daemon → client half of a WebSocket channel, bounded by what it really holds for the
 * peer: every frame not yet handed to the kernel counts at its payload plus `frameOverhead`, and
 * while a frame is in flight new output waits (compactly) to go out as one frame with the rest,
 * so a peer that reads slowly gets fewer, bigger frames instead of ever more tiny ones. Text
 * frames and the close go through here too, so they stay behind the output that preceded them.
 */
export class WsOutput {
  /** Frames handed to ws and not yet to the kernel, with their overhead. */
  private inFlightBytes = 0;
  private inFlightFrames = 0;
  /** Output waiting for the in-flight frame (tiny chunks copied together: see OutputChunks). */
  private pending = new OutputChunks();
  private readonly waiters = new Set<{ lowWater: number; resolve: () => void }>();

  constructor(
    private readonly ws: WebSocket,
    /** `send` reports false past this many bytes held for the peer. */
    private readonly highWater = 1024 * 1024,
  ) {
    ws.once('close', () => this.wake(true));
  }

  /** Bytes held for this peer: frames in flight (with their overhead) and output waiting. */
  get queued(): number {
    return this.inFlightBytes + this.pending.bytes;
  }

  /**
   * Queues output; false once more than `highWater` is held for the peer (pause the source and
   * wait for `drained`, or let the peer go), or when the socket is no longer open.
   */
  send(b: Buffer): boolean {
    if (this.ws.readyState !== WebSocket.OPEN) return false;
    if (b.length === 0) return true;
    if (this.inFlightFrames === 0) this.frame(b);
    else this.pending.push(b);
    return this.queued <= this.highWater;
  }

  /** A text frame (JSON control), after the output queued before it. */
  sendText(text: string): void {
    this.flush();
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
  }

  /** Closes after the output queued before (ws sends the close frame behind it). */
  close(code: number, reason: string): void {
    this.flush();
    this.ws.close(code, reason);
  }

  /** Resolves once at most `lowWater` bytes are held for the peer, or the socket closed. */
  drained(lowWater = this.highWater / 4): Promise<void> {
    if (this.queued <= lowWater || this.ws.readyState !== WebSocket.OPEN) return Promise.resolve();
    return new Promise((resolve) => this.waiters.add({ lowWater, resolve }));
  }

  private frame(b: Buffer): void {
    const cost = b.length + frameOverhead;
    this.inFlightBytes += cost;
    this.inFlightFrames++;
    // The callback comes once the frame is with the kernel (or with an error once the socket is gone).
    this.ws.send(b, { binary: true }, () => {
      this.inFlightBytes -= cost;
      this.inFlightFrames--;
      if (this.inFlightFrames === 0) this.flush();
      this.wake(false);
    });
  }

  /** Sends what waits as one frame. */
  private flush(): void {
    if (this.pending.bytes === 0) return;
    const parts = this.pending.chunks();
    this.pending = new OutputChunks();
    if (this.ws.readyState !== WebSocket.OPEN) return;
    this.frame(parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts));
  }

  private wake(closed: boolean): void {
    for (const w of this.waiters) {
      if (closed || this.queued <= w.lowWater) {
        this.waiters.delete(w);
        w.resolve();
      }
    }
  }
}

/** What one message from a client costs us beyond its bytes while it waits to be written. */
const messageOverhead = 1024;

const noop = (): void => {};

/** A message's bytes as one Buffer (ws hands over fragments as an array). */
function messageBytes(data: RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  if (Array.isArray(data)) return Buffer.concat(data);
  return Buffer.from(data);
}

/**
 * The client → daemon half of a WebSocket channel: binary frames go to `write`, whose promise
 * settles once the bytes have left the daemon's hands (the agent's window took them, the
 * console socket drained). Past `highWater` bytes in flight (each message counted with an
 * overhead, so tiny frames are bounded too) the socket is not read: a client that types faster
 * than the guest takes it is held back by TCP, not by our memory; reading resumes at a quarter.
 * Text frames go to `onText` (JSON control), or are input like binary ones without it.
 */
export function feedInput(
  ws: WebSocket,
  write: (b: Buffer) => Promise<unknown>,
  opts: { onText?: (text: string) => void; highWater?: number } = {},
): void {
  const highWater = opts.highWater ?? 1024 * 1024;
  let inFlight = 0;
  ws.on('message', (data: RawData, isBinary: boolean) => {
    const b = messageBytes(data);
    if (!isBinary && opts.onText) {
      opts.onText(b.toString('utf8'));
      return;
    }
    const cost = b.length + messageOverhead;
    inFlight += cost;
    // Messages already read from the socket still arrive after this; they are few and bounded.
    if (inFlight > highWater && !ws.isPaused) ws.pause();
    write(b)
      .catch(noop)
      .finally(() => {
        inFlight -= cost;
        if (inFlight <= highWater / 4 && ws.isPaused) ws.resume();
      });
  });
}
