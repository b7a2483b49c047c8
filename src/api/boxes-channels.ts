import { createReadStream, createWriteStream, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { type Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import Busboy from 'busboy';
import type { WebSocket } from 'ws';
import type { z } from 'zod';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import type { ExecEvent } from '../engine/exec-log.js';
import { HutchError, orStorageFull, toHutchError } from '../errors.js';
import type { boxAttachQuery, downloadBody } from './boxes-schemas.js';
import { sendFile, sendJson } from './http/respond.js';
import type { RequestParts, SseEvent, StreamParts } from './http/routes.js';
import { serveTerminal } from './terminal.js';

/**
 * The streaming side of the boxes API: exec events (SSE), file transfer (multipart uploads,
 * downloads) and the attach terminal. Each handler opens an engine session and only moves bytes.
 */

/** What the boxes API's handlers get besides the request. */
export interface BoxesApp {
  engine: Engine;
  act: Actions;
  version: string;
}

type Ctx<Q, B> = BoxesApp & RequestParts<Q, B>;

// ---- GET /v1/boxes/{id}/exec/{eid}/events ------------------------------------------------------

/**
 * Every event of the exec from the first, then live ones until its exit. The box and the exec
 * are looked up now, so an unknown one is an HTTP error rather than a cut stream.
 */
export function execEvents(ctx: Ctx<undefined, undefined>): AsyncGenerator<SseEvent> {
  const events = ctx.act.execEvents(ctx.params.id ?? '', ctx.params.eid ?? '');
  return (async function* () {
    try {
      for await (const e of events) yield { event: e.event, data: eventData(e) };
    } finally {
      await events.return(undefined);
    }
  })();
}

function eventData(e: ExecEvent): Record<string, unknown> {
  const data: Record<string, unknown> = { stream: e.stream, data: e.data, seq: e.seq };
  if (e.encoding) data.encoding = e.encoding;
  return data;
}

// ---- POST /v1/boxes/{id}/files/upload ----------------------------------------------------------

/** `dest` of an upload: absolute, no `..`; a trailing `/` means "this directory, the file's own name". */
export function uploadDest(dest: string, filename: string): string {
  if (!dest.startsWith('/') || dest.includes('\0') || dest.split('/').includes('..'))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `dest must be an absolute path without "..", got ${JSON.stringify(dest)}`,
    );
  if (!dest.endsWith('/')) return within(dest);
  const name = posix.basename(filename);
  if (!name || name === '.' || name === '..' || name.includes('\0'))
    throw new HutchError('INVALID_ARGUMENT', 'dest is a directory and the file part has no usable filename');
  return within(posix.join(dest, name));
}

/** A path the guest can take: at most PATH_MAX bytes (and the agent request stays one frame). */
function within(path: string): string {
  if (Buffer.byteLength(path) > 4096)
    throw new HutchError('INVALID_ARGUMENT', 'the destination path is longer than 4096 bytes');
  return path;
}

/**
 * Multipart upload: fields `file` and `dest` in either order. When `dest` comes first the file
 * streams straight into the box; otherwise it is spooled to a host temp file until `dest` is known.
 *
 * Whatever the body looks like, the handler returns only once everything it started has settled
 * (the write into the box, the spool file), so the spool is never removed under a stream still
 * writing it and no promise is left to reject after the answer.
 */
export async function uploadFile(ctx: Ctx<undefined, undefined> & StreamParts): Promise<void> {
  const { req, res } = ctx;
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
  const ops = await ctx.act.openBoxSession(ctx.params.id ?? '');
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
      const p = ops
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
    const r = await written;
    sendJson(res, 200, { ok: true, dest: r.dest, size: r.size });
  } catch (e) {
    // A failure of the handler itself (not of the body) stops the parse all the same.
    fail(toHutchError(e));
    throw e;
  } finally {
    await Promise.allSettled(started);
    ops.release();
    if (spool) rmSync(spool, { recursive: true, force: true });
  }
}

/** What a client may make the host hold for one upload whose dest it has not sent yet. */
const maxSpoolBytes = 64 * 1024 * 1024;

/** The host could not hold the spooled upload. */
function spoolError(e: unknown): HutchError {
  return orStorageFull(e, 'INTERNAL', `spooling the upload: ${(e as Error).message}`);
}

// ---- POST /v1/boxes/{id}/files/download --------------------------------------------------------

export async function downloadFile(
  ctx: Ctx<undefined, z.output<typeof downloadBody>> & StreamParts,
): Promise<void> {
  const { path } = ctx.body;
  const ops = await ctx.act.openBoxSession(ctx.params.id ?? '');
  try {
    await sendFile(ctx.res, path, await ops.readFile(path));
  } finally {
    ops.release();
  }
}

// ---- WebSocket /v1/boxes/{id}/attach -----------------------------------------------------------

export async function attachTerminal(
  ctx: Ctx<z.output<typeof boxAttachQuery>, undefined> & { accept: () => Promise<WebSocket> },
): Promise<void> {
  const ops = await ctx.act.openBoxSession(ctx.params.id ?? '');
  await serveTerminal(ops, ctx.query, ctx.accept, () => {
    let state = 'removed';
    try {
      state = ctx.act.getBox(ops.id).status;
    } catch {
      // gone: removed
    }
    return `box ${ops.id} went away (${state})`;
  });
}
