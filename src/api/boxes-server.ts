import { createReadStream, createWriteStream, mkdtempSync, rmSync } from 'node:fs';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { type Duplex, type Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import Busboy from 'busboy';
import { type WebSocket, WebSocketServer } from 'ws';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import { HutchError, orStorageFull, toHutchError } from '../errors.js';
import { AgentError } from '../guest/agent-connection.js';
import { boxRoutes, uploadDest } from './boxes-routes.js';
import { downloadBody } from './boxes-schemas.js';
import { attachmentDisposition } from './content-disposition.js';
import { writeRespectingBackpressure } from './exec-stream.js';
import { readJson, sendError, sendJson, sendResult } from './http-server.js';
import { createGuardedServer, defaultRequestLimits, type RequestLimits } from './request-guard.js';
import { compileRoutes, matchRoute, requestUrl } from './route-match.js';
import { parseWith } from './routes.js';
import { checkHandshake, feedInput, rejectUpgrade, WsOutput } from './ws-upgrade.js';

export interface BoxesApi {
  servers: Server[];
  /** `unix:<path>` and/or `http://host:port`. */
  endpoints: string[];
  close(): Promise<void>;
}

/**
 * The boxes API on a Unix socket (owner-only: whoever can open it has full control of the
 * boxes) and optionally on TCP. Routes are parsed here and handed to the engine; the handlers
 * below only move bytes (SSE, multipart, downloads, terminals).
 */
export async function startBoxesApi(
  engine: Engine,
  opts: {
    socketPath: string | null;
    listen?: string | undefined;
    act: Actions;
    version: string;
    limits?: RequestLimits;
  },
): Promise<BoxesApi> {
  const compiled = compileRoutes(boxRoutes);
  const wss = new WebSocketServer({ noServer: true, maxPayload: 1024 * 1024 });
  const { act } = opts;

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const url = requestUrl((req.url ?? '/').replace(/%3a/gi, ':'));
      const m = matchRoute(compiled, req.method ?? 'GET', url.pathname);
      if (m === 'method')
        throw new HutchError('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${url.pathname}`);
      if (!m) throw new HutchError('ROUTE_NOT_FOUND', `no endpoint ${req.method} ${url.pathname}`);
      const { route, params } = m;
      const query = url.searchParams;
      switch (route.kind) {
        case 'json': {
          const body = route.body ? await readJson(req) : undefined;
          const result = await route.handle({ engine, act, params, query, body, version: opts.version });
          await sendResult(res, route.status, result);
          return;
        }
        case 'events':
          return await serveEvents(act, params, req, res);
        case 'upload':
          return await serveUpload(act, params.id ?? '', req, res);
        case 'download':
          return await serveDownload(act, params.id ?? '', await readJson(req), res);
        case 'attach':
          throw new HutchError('INVALID_ARGUMENT', 'attach is a WebSocket endpoint: send an Upgrade request');
      }
    } catch (e) {
      const err = toHutchError(e);
      if (err.code === 'INTERNAL') console.error('internal error:', e);
      if (!res.headersSent) sendError(res, err);
      else res.destroy();
    }
  }

  async function upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    socket.on('error', () => {});
    try {
      const url = requestUrl(req.url);
      const m = matchRoute(compiled, 'GET', url.pathname);
      if (!m || m === 'method' || m.route.kind !== 'attach')
        throw new HutchError('ROUTE_NOT_FOUND', `no WebSocket endpoint ${url.pathname}`);
      if (req.method !== 'GET')
        throw new HutchError('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${url.pathname}`);
      checkHandshake(req);
      const q = url.searchParams;
      const dim = (name: string, dflt: number): number => {
        const v = q.get(name);
        if (v === null) return dflt;
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1 || n > 1000)
          throw new HutchError('INVALID_ARGUMENT', `${name} must be an integer 1–1000`);
        return n;
      };
      const term = q.get('term') ?? 'xterm-256color';
      if (!/^[A-Za-z0-9._+-]{1,64}$/.test(term)) throw new HutchError('INVALID_ARGUMENT', 'bad term');
      const shell = q.get('shell') ?? undefined;
      if (shell !== undefined && (!shell.startsWith('/') || shell.includes('\0') || shell.length > 4096))
        throw new HutchError('INVALID_ARGUMENT', 'shell must be an absolute path (no NUL, at most 4096)');
      const session = await act.boxTerminal(m.params.id ?? '', {
        ...(shell !== undefined ? { shell } : {}),
        cols: dim('cols', 80),
        rows: dim('rows', 24),
        term,
      });
      if (!socket.readable || !socket.writable) {
        // The client left while the shell started: ws would drop the socket without calling back.
        session.handle.cancel();
        session.release();
        socket.destroy();
        return;
      }
      wss.handleUpgrade(req, socket, head, (ws) => bridgeTerminal(ws, session));
    } catch (e) {
      rejectUpgrade(socket, toHutchError(e));
    }
  }

  const servers: Server[] = [];
  const endpoints: string[] = [];
  const make = (): Server => {
    const s = createGuardedServer(opts.limits ?? defaultRequestLimits, (req, res) => {
      void handle(req, res);
    });
    s.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      void upgrade(req, socket, head);
    });
    servers.push(s);
    return s;
  };
  if (opts.socketPath) {
    const path = opts.socketPath;
    rmSync(path, { force: true });
    const s = make();
    // The socket is created owner-only from the start (no window with wider permissions).
    const old = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.listen(path, () => resolve());
      });
    } finally {
      process.umask(old);
    }
    endpoints.push(`unix:${path}`);
  }
  if (opts.listen) {
    const i = opts.listen.lastIndexOf(':');
    const host = i > 0 ? opts.listen.slice(0, i) : '127.0.0.1';
    const port = Number(i >= 0 ? opts.listen.slice(i + 1) : opts.listen);
    const s = make();
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(port, host, () => resolve());
    });
    const addr = s.address() as AddressInfo;
    endpoints.push(`http://${addr.family === 'IPv6' ? `[${addr.address}]` : addr.address}:${addr.port}`);
  }
  return {
    servers,
    endpoints,
    close: async () => {
      for (const c of wss.clients) c.terminate();
      await Promise.all(
        servers.map(
          (s) =>
            new Promise<void>((resolve) => {
              s.close(() => resolve());
              s.closeAllConnections();
            }),
        ),
      );
      if (opts.socketPath) rmSync(opts.socketPath, { force: true });
    },
  };
}

/** Writes with backpressure; a client that went away ends the handler quietly. */
async function write(res: ServerResponse, chunk: string | Buffer): Promise<void> {
  await writeRespectingBackpressure(res, chunk).catch(() => {});
}

async function serveEvents(
  act: Actions,
  params: Record<string, string>,
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  const events = act.execEvents(params.id ?? '', params.eid ?? '');
  res.writeHead(200, {
    'content-type': 'text/event-stream',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
  res.flushHeaders();
  let gone = false;
  req.on('close', () => {
    gone = true;
  });
  try {
    for await (const e of events) {
      if (gone || res.destroyed) break;
      const data: Record<string, unknown> = { stream: e.stream, data: e.data, seq: e.seq };
      if (e.encoding) data.encoding = e.encoding;
      await write(res, `event: ${e.event}\ndata: ${JSON.stringify(data)}\n\n`);
    }
  } finally {
    await events.return(undefined);
    res.end();
  }
}

/**
 * Multipart upload: fields `file` and `dest` in either order. When `dest` comes first the file
 * streams straight into the box; otherwise it is spooled to a host temp file until `dest` is known.
 *
 * Whatever the body looks like, the handler returns only once everything it started has settled
 * (the write into the box, the spool file), so the spool is never removed under a stream still
 * writing it and no promise is left to reject after the answer.
 */
async function serveUpload(
  act: Actions,
  boxRef: string,
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  const ctype = req.headers['content-type'] ?? '';
  if (!/^multipart\/form-data/i.test(ctype))
    throw new HutchError(
      'INVALID_ARGUMENT',
      'upload needs a multipart/form-data body with fields file and dest',
    );
  let bb: Busboy.Busboy;
  try {
    bb = Busboy({ headers: req.headers, limits: { files: 1, fields: 8, parts: 16, fieldSize: 8192 } });
  } catch (e) {
    throw new HutchError('INVALID_ARGUMENT', `bad multipart body: ${(e as Error).message}`);
  }
  const session = await act.openBoxSession(boxRef);
  let spool: string | undefined;
  // Everything the body started; each is settled (never rejects) before the cleanup below.
  const started: Promise<unknown>[] = [];
  let failure: HutchError | undefined;
  let fail: (e: HutchError) => void = () => {};
  try {
    let dest: string | undefined;
    let filename = '';
    let written: Promise<{ dest: string; size: number }> | undefined;
    let spooled: Promise<string> | undefined;
    const toBox = (d: string, from: Readable): Promise<{ dest: string; size: number }> => {
      const p = session.agent
        .writeFile(d, from, { mode: 0o644, mkdirs: true })
        .then((r) => ({ dest: d, size: r.size }));
      started.push(p.catch(() => from.resume()));
      return p;
    };
    const parsed = new Promise<void>((resolve, reject) => {
      fail = (e) => {
        if (failure) return;
        failure = e;
        // Stops the parse; busboy destroys the file stream with it, ending its writer.
        req.unpipe(bb);
        bb.destroy(e);
        // The rest of the body is read and dropped, so the connection stays usable.
        req.resume();
        reject(e);
      };
      bb.on('field', (name, value, info) => {
        if (name !== 'dest') return;
        if (info.valueTruncated) fail(new HutchError('INVALID_ARGUMENT', 'dest is longer than 8192 bytes'));
        else dest = value;
      });
      bb.on('file', (name, stream, info) => {
        // Its errors reach the writer below (or come from our own failure): never unhandled.
        stream.on('error', () => {});
        if (name !== 'file' || failure) {
          stream.resume();
          return;
        }
        filename = info.filename ?? '';
        if (dest !== undefined) {
          let d: string;
          try {
            d = uploadDest(dest, filename);
          } catch (e) {
            stream.resume();
            fail(toHutchError(e));
            return;
          }
          written = toBox(d, stream);
        } else {
          try {
            spool = mkdtempSync(join(tmpdir(), 'hutch-upload-'));
          } catch (e) {
            stream.resume();
            fail(spoolError(e));
            return;
          }
          const path = join(spool, 'file');
          const out = createWriteStream(path, { mode: 0o600 });
          // The file is closed (or never opened) before the spool directory may go.
          started.push(new Promise<void>((r) => out.once('close', () => r())));
          let held = 0;
          const bounded = new Transform({
            transform(chunk: Buffer, _enc, done) {
              held += chunk.length;
              if (held <= maxSpoolBytes) return done(null, chunk);
              const e = new HutchError(
                'BODY_TOO_LARGE',
                `a file sent before the "dest" field is held on the host until dest arrives, at most ${maxSpoolBytes} bytes; send dest first to stream a file of any size`,
              );
              fail(e);
              done(e);
            },
          });
          spooled = pipeline(stream, bounded, out).then(() => path);
          started.push(spooled.catch(() => {}));
        }
      });
      bb.on('error', (e: Error) =>
        fail(new HutchError('INVALID_ARGUMENT', `bad multipart body: ${e.message}`)),
      );
      bb.on('close', () => resolve());
      req.on('error', () => fail(new HutchError('INVALID_ARGUMENT', 'the upload ended early')));
      req.on('close', () => {
        if (!req.complete) fail(new HutchError('INVALID_ARGUMENT', 'the upload ended early'));
      });
    });
    req.pipe(bb);
    await parsed;
    if (!written && !spooled)
      throw new HutchError('INVALID_ARGUMENT', 'the multipart body has no "file" field');
    if (dest === undefined)
      throw new HutchError('INVALID_ARGUMENT', 'the multipart body has no "dest" field');
    if (!written) {
      const d = uploadDest(dest, filename);
      let path: string;
      try {
        path = await (spooled as Promise<string>);
      } catch (e) {
        throw spoolError(e);
      }
      written = toBox(d, createReadStream(path));
    }
    let r: { dest: string; size: number };
    try {
      r = await written;
    } catch (e) {
      throw fileError(e, dest);
    }
    sendJson(res, 200, { ok: true, dest: r.dest, size: r.size });
  } catch (e) {
    // A failure of the handler itself (not of the body) stops the parse all the same.
    fail(toHutchError(e));
    throw e;
  } finally {
    await Promise.allSettled(started);
    session.release();
    if (spool) rmSync(spool, { recursive: true, force: true });
  }
}

/** What a client may make the host hold for one upload whose dest it has not sent yet. */
const maxSpoolBytes = 64 * 1024 * 1024;

/** The host could not hold the spooled upload. */
function spoolError(e: unknown): HutchError {
  return orStorageFull(e, 'INTERNAL', `spooling the upload: ${(e as Error).message}`);
}

async function serveDownload(
  act: Actions,
  boxRef: string,
  body: unknown,
  res: ServerResponse,
): Promise<void> {
  const { path } = parseWith(downloadBody, body);
  const session = await act.openBoxSession(boxRef);
  let h: ReturnType<typeof session.agent.readFile> | undefined;
  try {
    h = session.agent.readFile(path);
    h.done.catch(() => {});
    const it = h.stream[Symbol.asyncIterator]();
    let first: IteratorResult<Buffer>;
    try {
      first = (await it.next()) as IteratorResult<Buffer>;
    } catch (e) {
      throw fileError(e, path);
    }
    res.writeHead(200, {
      'content-type': 'application/octet-stream',
      'content-disposition': attachmentDisposition(basename(path)),
    });
    if (!first.done) await write(res, first.value);
    for (;;) {
      if (res.destroyed) return;
      const n = (await it.next()) as IteratorResult<Buffer>;
      if (n.done) break;
      await write(res, n.value);
    }
    await h.done;
    res.end();
  } catch (e) {
    if (res.headersSent) res.destroy();
    throw e;
  } finally {
    // Whatever ended the handler (the client went away, a failed write, an error), the read in
    // the guest ends too instead of waiting for a reader that is gone. A no-op once it is done.
    h?.stream.destroy();
    session.release();
  }
}

function fileError(e: unknown, path: string): HutchError {
  if (e instanceof AgentError) {
    if (e.code === 'ENOENT') return new HutchError('FILE_NOT_FOUND', `${path}: no such file in the box`);
    if (e.code === 'EISDIR') return new HutchError('NOT_A_FILE', `${path} is a directory`);
    return new HutchError(
      'INVALID_ARGUMENT',
      `${path}: ${e.code}${e.agentMessage ? ` (${e.agentMessage})` : ''}`,
    );
  }
  return toHutchError(e);
}

/** Binary frames ⇄ the terminal; text frames are JSON control: resize in, exit out. */
function bridgeTerminal(ws: WebSocket, session: Awaited<ReturnType<Engine['boxTerminal']>>): void {
  const { handle } = session;
  const out = new WsOutput(ws);
  let paused = false;
  const forward = (b: Buffer): void => {
    if (ws.readyState !== ws.OPEN || out.send(b) || paused) return;
    // A viewer that reads slowly pauses the guest's output rather than growing our buffers.
    paused = true;
    handle.stdout.pause();
    handle.stderr.pause();
    void out.drained().then(() => {
      paused = false;
      handle.stdout.resume();
      handle.stderr.resume();
    });
  };
  handle.stdout.on('data', forward);
  handle.stderr.on('data', forward);
  // Keys wait for the agent's window; past 1 MiB in flight the socket is not read.
  feedInput(ws, (b) => handle.write(b), {
    onText: (text) => {
      try {
        const msg = JSON.parse(text) as { type?: string; cols?: unknown; rows?: unknown };
        const ok = (n: unknown): n is number =>
          Number.isInteger(n) && (n as number) >= 1 && (n as number) <= 1000;
        if (msg.type === 'resize' && ok(msg.cols) && ok(msg.rows)) handle.resize(msg.cols, msg.rows);
        else out.sendText(JSON.stringify({ type: 'error', message: 'unknown control message' }));
      } catch {
        out.sendText(JSON.stringify({ type: 'error', message: 'control frames are JSON' }));
      }
    },
  });
  ws.on('close', () => {
    handle.cancel();
    session.release();
  });
  handle.result.then(
    (r) => {
      if (ws.readyState === ws.OPEN) {
        out.sendText(JSON.stringify({ type: 'exit', code: r.exitCode ?? 128 + (r.signal ?? 0) }));
        out.close(1000, 'exited');
      }
      session.release();
    },
    (e: unknown) => {
      if (ws.readyState === ws.OPEN) out.close(1011, (e as Error).message.slice(0, 100));
      session.release();
    },
  );
}
