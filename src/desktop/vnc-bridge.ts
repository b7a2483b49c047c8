import type { Duplex } from 'node:stream';
import { WebSocket } from 'ws';
import { closeCodes, feedInput, WsOutput } from '../api/http/websocket.js';

/**
 * A viewer's WebSocket spliced to a machine's VNC server (QEMU's `-vnc unix:…`), the way
 * websockify does it: RFB bytes in binary frames both ways, nothing parsed, so any RFB client
 * (noVNC, a native viewer behind a WebSocket shim) works and QEMU does the protocol. Each viewer
 * is its own bridge on its own connection to QEMU; QEMU runs with `share=force-shared`, so no
 * viewer can take the screen from the others (one asking for exclusive access is refused by
 * QEMU, the others stay).
 *
 * Memory is bounded both ways, whatever the peers do:
 * - VNC → viewer: output waits in `WsOutput` (payload + per-frame overhead counted); past
 *   `highWater` the VNC socket is not read until the viewer has taken three quarters of it.
 *   RFB is pull-based (a FramebufferUpdate answers a request) and QEMU throttles a client whose
 *   socket it cannot write to, so a viewer that never reads costs at most `highWater` here.
 * - viewer → VNC: `feedInput` stops reading the WebSocket while more than `highWater` bytes
 *   wait for the VNC socket to drain (pointer floods, a paused QEMU).
 */
export interface VncBridgeOptions {
  /** Aborting ends the bridge with 1001 and the abort reason (a string) as the close reason. */
  signal?: AbortSignal | undefined;
  /**
   * Asked when the VNC server ends the connection: a reason when that is because the machine
   * went away (the viewer gets 1001 with it), undefined for an ordinary end (1000).
   */
  goneReason?: (() => string | undefined) | undefined;
  /** Bytes held for one side before the other is no longer read (default 1 MiB). */
  highWater?: number | undefined;
}

/** Close reasons are at most 123 bytes (RFC 6455 §5.5). */
function reasonOf(s: string): string {
  const b = Buffer.from(s);
  return b.length <= 123
    ? s
    : `${b
        .subarray(0, 120)
        .toString('utf8')
        .replace(/\uFFFD$/, '')}...`;
}

export function bridgeVnc(ws: WebSocket, socket: Duplex, opts: VncBridgeOptions = {}): void {
  const highWater = opts.highWater ?? 1024 * 1024;
  if (ws.readyState !== WebSocket.OPEN) {
    // The viewer left between the upgrade and now: its 'close' has come and gone.
    socket.destroy();
    return;
  }
  const out = new WsOutput(ws, highWater);
  let ended = false;
  const end = (code: number, reason: string): void => {
    if (ended) return;
    ended = true;
    opts.signal?.removeEventListener('abort', onAbort);
    socket.destroy();
    if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING)
      out.close(code, reasonOf(reason));
  };
  const onAbort = (): void => {
    const r = opts.signal?.reason;
    end(closeCodes.goingAway, typeof r === 'string' ? r : 'the machine went away');
  };

  // VNC server → viewer.
  socket.on('data', (b: Buffer) => {
    if (out.send(b)) return;
    if (ws.readyState !== WebSocket.OPEN) return;
    socket.pause();
    void out.drained().then(() => {
      if (!ended) socket.resume();
    });
  });
  const serverEnded = (): void => {
    if (ended) return;
    const gone = opts.goneReason?.();
    if (gone !== undefined) end(closeCodes.goingAway, gone);
    else end(closeCodes.normal, 'the VNC server closed the connection');
  };
  socket.on('end', serverEnded);
  socket.on('close', serverEnded);
  socket.on('error', (e: NodeJS.ErrnoException) => {
    // A QEMU that exits (or is killed) with bytes unread resets the connection: an end too.
    if (e.code === 'ECONNRESET' || e.code === 'EPIPE') serverEnded();
    else if (!ended) end(closeCodes.internal, `VNC connection failed: ${e.message}`);
  });

  // Viewer → VNC server. The write callback comes once the bytes are with the kernel (or the
  // socket is gone): what feedInput counts as in flight is what Node holds for QEMU.
  feedInput(
    ws,
    (b) =>
      new Promise<void>((resolve) => {
        if (ended || socket.destroyed) {
          resolve();
          return;
        }
        socket.write(b, () => resolve());
      }),
    {
      highWater,
      onText: () => end(closeCodes.unsupported, 'RFB is binary: text frames are refused'),
    },
  );
  ws.on('close', () => {
    ended = true;
    opts.signal?.removeEventListener('abort', onAbort);
    socket.destroy();
  });
  ws.on('error', () => {});

  if (opts.signal?.aborted) onAbort();
  else opts.signal?.addEventListener('abort', onAbort, { once: true });
}
