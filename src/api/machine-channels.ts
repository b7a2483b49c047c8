import type { IncomingMessage, ServerResponse } from 'node:http';
import { performance } from 'node:perf_hooks';
import type { Readable } from 'node:stream';
import type { WebSocket } from 'ws';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import { HutchError } from '../errors.js';
import { AgentError, type ExecHandle } from '../guest/agent-connection.js';
import type { ConsoleTap } from '../vmm/console.js';
import { attachmentDisposition } from './content-disposition.js';
import { encodeEvent, OutputEncoder, writeRespectingBackpressure } from './exec-stream.js';
import { parseWith } from './routes.js';
import { attachQuery, execBody } from './schemas.js';
import { closeCodes, feedInput, type UpgradeContext, WsOutput } from './ws-upgrade.js';

/**
 * The streaming side of the machines API: live exec output, file transfer and the WebSocket
 * channels (serial console, PTY shell). Each handler opens an engine session (the machine is
 * busy, never idle, while it runs) and only moves bytes between the client and the guest agent.
 */

export interface StreamContext {
  engine: Engine;
  act: Actions;
  params: Record<string, string>;
  query: URLSearchParams;
  body: unknown;
  req: IncomingMessage;
  res: ServerResponse;
}

export type ChannelContext = UpgradeContext & { engine: Engine; act: Actions };

const noop = (): void => {};

function agentFailure(e: unknown, what: string, machine: string): HutchError {
  if (e instanceof HutchError) return e;
  if (e instanceof AgentError)
    return new HutchError(
      'EXEC_FAILED',
      `cannot run ${what}: ${e.code}${e.agentMessage ? ` (${e.agentMessage})` : ''}`,
      { errno: e.code },
    );
  return new HutchError('AGENT_UNAVAILABLE', `machine ${machine}: ${(e as Error).message}`);
}

function fileFailure(e: unknown, path: string, machine: string): HutchError {
  if (e instanceof HutchError) return e;
  if (e instanceof AgentError) {
    if (e.code === 'ENOENT' || e.code === 'ENOTDIR')
      return new HutchError('FILE_NOT_FOUND', `no file ${JSON.stringify(path)} in machine ${machine}`);
    if (e.code === 'EISDIR')
      return new HutchError('NOT_A_FILE', `${JSON.stringify(path)} is a directory`, { errno: e.code });
    return new HutchError(
      'FILE_TRANSFER_FAILED',
      `${path}: ${e.code}${e.agentMessage ? ` (${e.agentMessage})` : ''}`,
      { errno: e.code },
    );
  }
  return new HutchError('AGENT_UNAVAILABLE', `machine ${machine}: ${(e as Error).message}`);
}

// ---- POST /v1/machines/{id}/exec/stream ---------------------------------------------------------

export async function execStream(ctx: StreamContext): Promise<void> {
  const b = parseWith(execBody, ctx.body);
  const argv = typeof b.cmd === 'string' ? ['/bin/sh', '-c', b.cmd] : b.cmd;
  const session = await ctx.act.openSession(ctx.params.id ?? '');
  const t0 = performance.now();
  let h: ExecHandle;
  try {
    h = session.agent.exec({
      argv,
      ...(b.env ? { env: b.env } : {}),
      ...(b.cwd ? { cwd: b.cwd } : {}),
      stdin: b.stdin !== undefined,
      timeoutMs: b.timeout_ms ?? 60_000,
    });
    h.result.catch(noop);
    await h.started;
  } catch (e) {
    session.release();
    throw agentFailure(e, JSON.stringify(argv[0]), session.id);
  }
  const { res } = ctx;
  let finished = false;
  res.on('close', () => {
    // The client went away before the end: the command goes too.
    if (!finished) h.cancel();
  });
  if (b.stdin !== undefined)
    h.write(b.stdin)
      .then(() => h.end())
      .catch(noop);
  res.writeHead(200, {
    'content-type': 'application/x-ndjson',
    'cache-control': 'no-store',
    'x-content-type-options': 'nosniff',
  });
  res.flushHeaders();
  const write = (line: string): Promise<void> => writeRespectingBackpressure(res, line);
  const pump = async (r: Readable, enc: OutputEncoder): Promise<void> => {
    for await (const chunk of r as AsyncIterable<Buffer>) {
      const ev = enc.push(chunk);
      if (ev) await write(encodeEvent(ev));
    }
    const ev = enc.flush();
    if (ev) await write(encodeEvent(ev));
  };
  try {
    const [result] = await Promise.all([
      h.result,
      pump(h.stdout, new OutputEncoder('stdout')),
      pump(h.stderr, new OutputEncoder('stderr')),
    ]);
    await write(
      encodeEvent({
        type: 'exit',
        exit_code: result.exitCode,
        signal: result.signal,
        timed_out: result.timedOut,
        duration_ms: Math.round(performance.now() - t0),
      }),
    );
    finished = true;
    res.end();
  } catch (e) {
    if (res.destroyed) {
      h.cancel();
    } else {
      const err = agentFailure(e, JSON.stringify(argv[0]), session.id);
      finished = true;
      h.cancel();
      res.end(encodeEvent({ type: 'error', code: err.code, message: err.message }));
    }
  } finally {
    session.release();
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

export async function upload(ctx: StreamContext): Promise<{ path: string; size: number }> {
  const name = uploadName(ctx.req.headers['x-filename']);
  const path = `/root/${name}`;
  const session = await ctx.act.openSession(ctx.params.id ?? '');
  try {
    // The request stream itself: read only as fast as the agent's window lets the guest write.
    const r = await session.agent.writeFile(path, ctx.req, { mode: 0o644 });
    return { path, size: r.size };
  } catch (e) {
    if (ctx.req.destroyed || !ctx.req.complete)
      throw new HutchError('INVALID_ARGUMENT', `upload of ${path} ended early: ${(e as Error).message}`);
    throw fileFailure(e, path, session.id);
  } finally {
    session.release();
  }
}

// ---- GET /v1/machines/{id}/download?path= --------------------------------------------------------

export async function download(ctx: StreamContext): Promise<void> {
  const path = ctx.query.get('path') ?? '';
  if (!path.startsWith('/') || path.includes('\0'))
    throw new HutchError('INVALID_ARGUMENT', 'path: an absolute path in the machine is required (?path=/…)');
  const session = await ctx.act.openSession(ctx.params.id ?? '');
  const { res } = ctx;
  try {
    const file = session.agent.readFile(path);
    file.done.catch(noop);
    // The size for content-length, asked for beside the read (the read alone says it at the end).
    const sizeP = session.agent
      .execCollect({ argv: ['stat', '-L', '-c', '%F:%s', '--', path] }, { maxOutputBytes: 4096 })
      .then((r) => {
        const m = /^regular (?:empty )?file:(\d+)\n?$/.exec(r.stdout.toString('utf8'));
        return r.exitCode === 0 && m?.[1] ? Number(m[1]) : undefined;
      })
      .catch(() => undefined);
    const it = (file.stream as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
    // The first 64 KiB are read before answering: a file that ends within them gets its exact
    // length, and a read that fails early gets a proper error rather than a cut connection.
    const head: Buffer[] = [];
    let headBytes = 0;
    let ended = false;
    try {
      while (headBytes < downloadHeadBytes) {
        const r = await it.next();
        if (r.done) {
          ended = true;
          break;
        }
        head.push(r.value);
        headBytes += r.value.length;
      }
    } catch (e) {
      await it.return?.();
      throw fileFailure(e, path, session.id);
    }
    const stat = await sizeP;
    // stat's size is trusted only beyond what was read: pseudo-files say 0 (/proc) or 4096
    // (/sys) whatever they hold, and both are shorter than 64 KiB or say 0.
    const size = ended ? headBytes : stat !== undefined && stat > headBytes ? stat : undefined;
    const base = path.slice(path.lastIndexOf('/') + 1) || 'download';
    res.writeHead(200, {
      'content-type': 'application/octet-stream',
      'content-disposition': attachmentDisposition(base),
      ...(size !== undefined ? { 'content-length': size } : {}),
    });
    let sent = 0;
    try {
      const send = async (b: Buffer): Promise<void> => {
        sent += b.length;
        if (size !== undefined && sent > size) throw new Error(`${path} grew while it was sent`);
        await writeRespectingBackpressure(res, b);
      };
      for (const b of head) await send(b);
      if (!ended) for (let r = await it.next(); !r.done; r = await it.next()) await send(r.value);
      await file.done;
      if (size !== undefined && sent !== size) throw new Error(`${path} changed size while it was sent`);
      res.end();
    } catch (e) {
      // Headers are out: the only honest signal left is a cut connection.
      await it.return?.();
      res.destroy(e as Error);
    }
  } finally {
    session.release();
  }
}

/** What a download reads before it answers (see download). */
const downloadHeadBytes = 64 * 1024;

// ---- WebSocket /v1/machines/{id}/tty ------------------------------------------------------------

/** Opens the machine's console, keeping the machine busy (a paused one can be watched too). */
async function openConsole(
  ctx: ChannelContext,
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

export async function tty(ctx: ChannelContext): Promise<void> {
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
    const state = (() => {
      try {
        return ctx.act.get(c.id).status;
      } catch {
        return 'destroyed';
      }
    })();
    out.close(closeCodes.goingAway, `machine ${c.id} went away (${state})`);
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

export async function attach(ctx: ChannelContext): Promise<void> {
  const q = parseWith(attachQuery, Object.fromEntries(ctx.query));
  const session = await ctx.act.openSession(ctx.params.id ?? '');
  let h: ExecHandle;
  let ws: WebSocket;
  try {
    h = session.agent.exec({
      argv: [q.shell],
      env: { TERM: q.term },
      cwd: '/root',
      stdin: true,
      pty: { cols: q.cols, rows: q.rows },
    });
    h.result.catch(noop);
    try {
      await h.started;
    } catch (e) {
      throw agentFailure(e, JSON.stringify(q.shell), session.id);
    }
    ws = await ctx.accept().catch((e: unknown) => {
      h.cancel();
      throw e;
    });
  } catch (e) {
    session.release();
    throw e;
  }
  let exited = false;
  ws.on('error', noop);
  ws.on('close', () => {
    if (!exited) h.cancel();
    session.release();
  });
  const out = new WsOutput(ws);
  // Keys wait for the agent's window; past 1 MiB in flight the socket is not read.
  feedInput(ws, (b) => h.write(b), {
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
        if (ok(msg.cols) && ok(msg.rows)) h.resize(msg.cols, msg.rows);
      }
      // Unknown control messages are ignored, so clients can be newer than the server.
    },
  });
  const pump = async (): Promise<void> => {
    for await (const chunk of h.stdout as AsyncIterable<Buffer>) {
      if (!out.send(chunk)) await out.drained();
    }
  };
  try {
    const [result] = await Promise.all([h.result, pump()]);
    exited = true;
    if (ws.readyState === ws.OPEN) {
      const code = result.exitCode ?? 128 + (result.signal ?? 9);
      out.sendText(JSON.stringify({ type: 'exit', code }));
      out.close(closeCodes.normal, 'shell exited');
    }
  } catch (e) {
    exited = true;
    h.cancel();
    const state = (() => {
      try {
        return ctx.act.get(session.id).status;
      } catch {
        return 'destroyed';
      }
    })();
    out.close(
      closeCodes.goingAway,
      `machine ${session.id} went away (${state}): ${(e as Error).message}`.slice(0, 120),
    );
  }
}
