import { performance } from 'node:perf_hooks';
import type { WebSocket } from 'ws';
import type { z } from 'zod';
import type { AuthService } from '../auth/auth-service.js';
import type { Actions } from '../core/dispatch.js';
import type { Principal } from '../core/principal.js';
import type { Engine } from '../engine/engine.js';
import { HutchError } from '../errors.js';
import type { PreviewProxy } from '../net/preview/preview-proxy.js';
import type { ConsoleTap } from '../vmm/console.js';
import { OutputEncoder } from './exec-stream.js';
import { sendFile } from './http/respond.js';
import type { NdjsonWriter, RequestParts, StreamParts } from './http/routes.js';
import { closeCodes, feedInput, WsOutput } from './http/websocket.js';
import type { attachQuery, downloadQuery, execBody } from './schemas.js';
import { serveTerminal } from './terminal.js';

/**
 * The streaming side of the machines API: live exec output, file transfer and the WebSocket
 * channels (serial console, PTY shell). Each handler opens an engine session (the machine is
 * busy, never idle, while it runs) and only moves bytes between the client and the guest.
 */

/** What the machines API's handlers get besides the request. */
export interface MachinesApp {
  engine: Engine;
  /** For the token exchange (a public route) only: everything else goes through `act`. */
  auth: AuthService;
  /** Who the request is for (null on public routes); the account routes need it, nothing else. */
  me: Principal | null;
  act: Actions;
  /** Web previews (net/preview/); absent where the daemon serves none. */
  previews?: PreviewProxy | undefined;
}

type Ctx<Q, B> = MachinesApp & RequestParts<Q, B>;

const noop = (): void => {};

/** A machine's state for a close reason, `destroyed` once it is gone. */
function stateOf(ctx: MachinesApp, id: string): string {
  try {
    return ctx.act.get(id).status;
  } catch {
    return 'destroyed';
  }
}

// ---- POST /v1/machines/{id}/exec/stream ---------------------------------------------------------

export async function execStream(
  ctx: Ctx<undefined, z.output<typeof execBody>> & StreamParts & { ndjson: () => NdjsonWriter },
): Promise<void> {
  const b = ctx.body;
  const ops = await ctx.act.openSession(ctx.params.id ?? '');
  const t0 = performance.now();
  try {
    const p = await ops.exec({
      argv: typeof b.cmd === 'string' ? ['/bin/sh', '-c', b.cmd] : b.cmd,
      ...(b.env ? { env: b.env } : {}),
      ...(b.cwd ? { cwd: b.cwd } : {}),
      stdin: b.stdin !== undefined,
      ...(b.timeout_ms !== undefined ? { timeoutMs: b.timeout_ms } : {}),
    });
    // The client went away before the end (or while it started): the command goes too.
    if (ctx.signal.aborted) p.cancel();
    ctx.signal.addEventListener('abort', () => p.cancel());
    if (b.stdin !== undefined)
      p.write(b.stdin)
        .then(() => p.end())
        .catch(noop);
    const send = ctx.ndjson();
    const encoders = { stdout: new OutputEncoder('stdout'), stderr: new OutputEncoder('stderr') };
    try {
      const result = await p.run(async (stream, chunk) => {
        const ev = encoders[stream].push(chunk);
        if (ev) await send(ev);
      });
      for (const enc of Object.values(encoders)) {
        const ev = enc.flush();
        if (ev) await send(ev);
      }
      await send({
        type: 'exit',
        exit_code: result.exitCode,
        signal: result.signal,
        timed_out: result.timedOut,
        duration_ms: Math.round(performance.now() - t0),
      });
    } catch (e) {
      p.cancel();
      if (ctx.signal.aborted || !(e instanceof HutchError)) return;
      // Headers are out: the failure is the last line.
      await send({ type: 'error', code: e.code, message: e.message }).catch(noop);
    }
  } finally {
    ops.release();
  }
}

// ---- POST /v1/machines/{id}/upload --------------------------------------------------------------

/**
 * The file name of an upload: the X-Filename header, percent-decoded (so any UTF-8 name can be
 * sent), one path component: not empty, no `/`, no NUL, no `..`, at most 255 bytes.
 */
export function uploadName(header: string | string[] | undefined): string {
  const raw = Array.isArray(header) ? header[0] : header;
  if (raw === undefined || raw === '')
    throw new HutchError('INVALID_ARGUMENT', 'X-Filename: the header is required (the file name in /root)');
  let name: string;
  try {
    name = decodeURIComponent(raw);
  } catch {
    throw new HutchError('INVALID_ARGUMENT', 'X-Filename: not valid percent-encoding');
  }
  if (name === '' || name === '.' || name.includes('/') || name.includes('\0') || name.includes('..'))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `X-Filename: ${JSON.stringify(name)} is not a plain file name (no "/", "..", NUL; not empty)`,
    );
  if (Buffer.byteLength(name) > 255)
    throw new HutchError('INVALID_ARGUMENT', 'X-Filename: longer than 255 bytes');
  return name;
}

export async function upload(
  ctx: Ctx<undefined, undefined> & StreamParts,
): Promise<{ path: string; size: number }> {
  const name = uploadName(ctx.req.headers['x-filename']);
  const path = `/root/${name}`;
  const ops = await ctx.act.openSession(ctx.params.id ?? '');
  try {
    // The request stream itself: read only as fast as the agent's window lets the guest write.
    const r = await ops.writeFile(path, ctx.req, { mode: 0o644 });
    return { path, size: r.size };
  } catch (e) {
    // A body that stopped coming is the client's doing, whatever the guest made of it.
    if (ctx.req.destroyed || !ctx.req.complete)
      throw new HutchError('INVALID_ARGUMENT', `upload of ${path} ended early: ${(e as Error).message}`);
    throw e;
  } finally {
    ops.release();
  }
}

// ---- GET /v1/machines/{id}/download?path= --------------------------------------------------------

export async function download(
  ctx: Ctx<z.output<typeof downloadQuery>, undefined> & StreamParts,
): Promise<void> {
  const { path } = ctx.query;
  const ops = await ctx.act.openSession(ctx.params.id ?? '');
  try {
    await sendFile(ctx.res, path, await ops.readFile(path));
  } finally {
    ops.release();
  }
}

// ---- WebSocket /v1/machines/{id}/tty ------------------------------------------------------------

/** Opens the machine's console, keeping the machine busy (a paused one can be watched too). */
async function openConsole(
  ctx: Ctx<undefined, undefined>,
): Promise<{ id: string; console: ConsoleTap; release: () => void }> {
  const id = ctx.params.id ?? '';
  try {
    const s = await ctx.act.openSession(id);
    try {
      return { ...ctx.act.consoleOf(s.id), release: s.release };
    } catch (e) {
      s.release();
      throw e;
    }
  } catch (e) {
    // Paused: no session (its agent is frozen), but the console is there to watch.
    if (e instanceof HutchError && e.code === 'MACHINE_NOT_RUNNING')
      return { ...ctx.act.consoleOf(id), release: noop };
    throw e;
  }
}

/** Keyboard input goes to the console socket in slices of this size. */
const consoleSlice = 16 * 1024;

export async function tty(
  ctx: Ctx<undefined, undefined> & { accept: () => Promise<WebSocket> },
): Promise<void> {
  const c = await openConsole(ctx);
  let ws: WebSocket;
  try {
    ws = await ctx.accept();
  } catch (e) {
    c.release();
    throw e;
  }
  const out = new WsOutput(ws, 4 * 1024 * 1024);
  const onData = (b: Buffer): void => {
    if (!out.send(b))
      // The console does not wait for anyone: a viewer that cannot keep up is let go.
      out.close(closeCodes.tryAgainLater, 'console viewer fell behind');
  };
  const onStop = (): void => {
    out.close(closeCodes.goingAway, `machine ${c.id} went away (${stateOf(ctx, c.id)})`);
  };
  let open = true;
  ws.on('close', () => {
    open = false;
    c.console.off('data', onData);
    c.console.off('stop', onStop);
    c.release();
  });
  ws.on('error', noop);
  // Keys: a serial line is slow (tens of KB/s), so little is let in flight before the socket
  // stops being read, and a message goes out a slice at a time, in order: what a viewer sent
  // and had not gone out when it left is dropped rather than typed for minutes after.
  let typed = Promise.resolve();
  const type = async (b: Buffer): Promise<void> => {
    for (let off = 0; off < b.length && open; off += consoleSlice)
      await c.console.write(b.subarray(off, off + consoleSlice));
  };
  feedInput(
    ws,
    (b) => {
      typed = typed.then(() => type(b));
      return typed;
    },
    { highWater: 64 * 1024 },
  );
  // Replay then subscribe in one tick: no output is lost or shown twice.
  const recent = c.console.recent();
  if (recent.length) out.send(recent);
  c.console.on('data', onData);
  c.console.once('stop', onStop);
}

// ---- WebSocket /v1/machines/{id}/attach ---------------------------------------------------------

export async function attach(
  ctx: Ctx<z.output<typeof attachQuery>, undefined> & { accept: () => Promise<WebSocket> },
): Promise<void> {
  const ops = await ctx.act.openSession(ctx.params.id ?? '');
  await serveTerminal(
    ops,
    ctx.query,
    ctx.accept,
    () => `machine ${ops.id} went away (${stateOf(ctx, ops.id)})`,
  );
}
