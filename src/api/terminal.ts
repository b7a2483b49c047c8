import type { WebSocket } from 'ws';
import type { GuestOps, GuestProcess, TerminalRequest } from '../guest/guest-ops.js';
import { closeCodes, feedInput, WsOutput } from './http/websocket.js';

const noop = (): void => {};

/**
 * A shell on a PTY bridged to a WebSocket, for every attach endpoint (machines and boxes): binary
 * frames are raw terminal I/O; text frames are JSON control: `{"type":"resize","cols","rows"}` in
 * (unknown types ignored, so clients can be newer than the server), `{"type":"exit","code"}` out
 * before close 1000. Closing the socket kills the shell; 1001 with a reason when the guest goes.
 * Takes over `ops`: it is released when the socket closes (or here, on a refusal).
 */
export async function serveTerminal(
  ops: GuestOps,
  request: TerminalRequest,
  accept: () => Promise<WebSocket>,
  /** Why the shell ended when the guest went away, e.g. "machine m-1 went away (failed)". */
  gone: () => string,
): Promise<void> {
  let term: GuestProcess;
  let ws: WebSocket;
  try {
    term = await ops.terminal(request);
    ws = await accept().catch((e: unknown) => {
      term.cancel();
      throw e;
    });
  } catch (e) {
    ops.release();
    throw e;
  }
  let exited = false;
  ws.on('error', noop);
  ws.on('close', () => {
    if (!exited) term.cancel();
    ops.release();
  });
  const out = new WsOutput(ws);
  // Keys wait for the agent's window; past 1 MiB in flight the socket is not read.
  feedInput(ws, (b) => term.write(b), {
    onText: (text) => {
      let msg: { type?: unknown; cols?: unknown; rows?: unknown };
      try {
        msg = JSON.parse(text) as typeof msg;
      } catch {
        out.close(closeCodes.unsupported, 'text frames must be JSON control messages');
        return;
      }
      if (msg.type === 'resize') {
        const ok = (n: unknown): n is number =>
          Number.isInteger(n) && (n as number) >= 1 && (n as number) <= 1000;
        if (ok(msg.cols) && ok(msg.rows)) term.resize(msg.cols, msg.rows);
      }
    },
  });
  try {
    // A viewer that reads slowly holds the guest's output back rather than growing our buffers.
    const result = await term.run(async (_, chunk) => {
      if (!out.send(chunk)) await out.drained();
    });
    exited = true;
    if (ws.readyState === ws.OPEN) {
      out.sendText(JSON.stringify({ type: 'exit', code: result.exitCode ?? 128 + (result.signal ?? 9) }));
      out.close(closeCodes.normal, 'shell exited');
    }
  } catch (e) {
    exited = true;
    term.cancel();
    out.close(closeCodes.goingAway, `${gone()}: ${(e as Error).message}`.slice(0, 120));
  }
}
