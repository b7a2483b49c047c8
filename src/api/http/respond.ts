import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { HeldText } from '../../engine/output-budget.js';
import { errorTable, HutchError } from '../../errors.js';
import type { GuestFile } from '../../guest/guest-ops.js';
import { attachmentDisposition } from '../content-disposition.js';
import { StalledReaderError, writeRespectingBackpressure } from '../exec-stream.js';
import type { ErrorShape } from './routes.js';

/**
 * The one way hutch answers over HTTP: errors (on a response, or on a bare socket for upgrades
 * and requests node could not parse), JSON results, request bodies, file downloads.
 */

const maxBodyBytes = 1024 * 1024;

/** An error's body: `{"code","message"}` and its details (e.g. `errno`). */
function errorBody(e: HutchError, extra?: Record<string, unknown>): string {
  return JSON.stringify({ code: e.code, message: e.message, ...(e.details ?? {}), ...(extra ?? {}) });
}

/**
 * Sends an error with its code's status; `close` also ends the connection (a body left unread);
 * `shape` adds a route's own error fields and headers (routes.ts ErrorShape).
 */
export function sendError(
  res: ServerResponse,
  e: HutchError,
  opts: { close?: boolean; shape?: ErrorShape | undefined } = {},
): void {
  const extra = opts.shape?.(e);
  const body = errorBody(e, extra?.body);
  res.writeHead(errorTable[e.code].http, {
    ...(extra?.headers ?? {}),
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
    ...(opts.close ? { connection: 'close' } : {}),
  });
  res.end(body);
}

/**
 * Writes an HTTP error on a socket no ServerResponse goes with (an upgrade request, or a request
 * node could not parse), then closes it.
 */
export function rejectUpgrade(socket: Duplex, error: HutchError): void {
  const status = errorTable[error.code].http;
  const body = errorBody(error);
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  socket.once('finish', () => socket.destroy());
  socket.end(
    `HTTP/1.1 ${status} ${httpReason(status)}\r\n` +
      'connection: close\r\n' +
      'content-type: application/json\r\n' +
      `content-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
}

function httpReason(status: number): string {
  const reasons: Record<number, string> = {
    400: 'Bad Request',
    403: 'Forbidden',
    404: 'Not Found',
    405: 'Method Not Allowed',
    408: 'Request Timeout',
    409: 'Conflict',
    413: 'Payload Too Large',
    422: 'Unprocessable Entity',
    426: 'Upgrade Required',
    429: 'Too Many Requests',
    500: 'Internal Server Error',
    501: 'Not Implemented',
    502: 'Bad Gateway',
    503: 'Service Unavailable',
    504: 'Gateway Timeout',
    507: 'Insufficient Storage',
  };
  return reasons[status] ?? 'Error';
}

export function sendJson(res: ServerResponse, status: number, value: unknown): void {
  if (status === 204 || value === undefined) {
    res.writeHead(status === 200 ? 204 : status).end();
    return;
  }
  const body = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

/** Pieces of a streamed reply are gathered up to this size before each write. */
const replyPiece = 64 * 1024;

/** How long a buffered reply waits for a client that reads nothing before cutting it off. */
const replyStallMs = 30_000;

/**
 * sendJson for a route's result, which may carry held exec output (HeldText): then the reply
 * is written a piece at a time as the client takes it, never as one string (a 32 MiB binary
 * output decodes and escapes to several times that), and the output's budget is given back
 * once it is written or the client has gone. Same bytes as JSON.stringify of the result.
 */
export async function sendResult(res: ServerResponse, status: number, value: unknown): Promise<void> {
  const entries = value !== null && typeof value === 'object' ? Object.entries(value) : [];
  const held = entries.map(([, v]) => v).filter((v): v is HeldText => v instanceof HeldText);
  if (held.length === 0) {
    sendJson(res, status, value);
    return;
  }
  try {
    res.writeHead(status, { 'content-type': 'application/json' });
    let piece = '';
    const put = async (s: string): Promise<void> => {
      piece += s;
      if (piece.length < replyPiece) return;
      const out = piece;
      piece = '';
      // Held output is a shared budget: a client that stops reading gives its share back.
      await writeRespectingBackpressure(res, out, undefined, replyStallMs);
    };
    let sep = '{';
    for (const [k, v] of entries) {
      if (v === undefined) continue;
      await put(`${sep}${JSON.stringify(k)}:`);
      sep = ',';
      if (v instanceof HeldText) {
        for (const p of v.jsonPieces()) await put(p);
        v.release();
      } else {
        await put(JSON.stringify(v));
      }
    }
    res.end(`${piece}}`);
  } catch (e) {
    // Headers are out: a cut connection is all that is left to say. A client that went away
    // is no error of ours; anything else is.
    if (!res.destroyed && !(e instanceof StalledReaderError)) console.error('reply failed:', e);
    res.destroy();
  } finally {
    for (const h of held) h.release();
  }
}

/**
 * Reads a JSON body whatever its content-type (curl -d sends form encoding by default), of at
 * most `maxBytes` (a body that says it is larger is refused before a byte is read).
 */
export async function readJson(req: IncomingMessage, maxBytes = maxBodyBytes): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  if (Number(req.headers['content-length'] ?? 0) > maxBytes)
    throw new HutchError('BODY_TOO_LARGE', `request body over ${maxBytes} bytes`);
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > maxBytes) throw new HutchError('BODY_TOO_LARGE', `request body over ${maxBytes} bytes`);
      chunks.push(chunk);
    }
  } catch (e) {
    if (e instanceof HutchError) throw e;
    // The client went away or was cut off mid-body: its mistake, not the server's.
    throw new HutchError('INVALID_ARGUMENT', `the request body ended early (${(e as Error).message})`);
  }
  const text = Buffer.concat(chunks).toString('utf8').trim();
  if (text === '') return undefined;
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new HutchError('INVALID_JSON', `request body is not valid JSON: ${(e as Error).message}`);
  }
}

/**
 * Sends a file read from a guest as a download: content-length when its size is known, named
 * after the last component of `path`. Once the headers are out a failure can only cut the
 * connection (the client sees a short body, never a wrong one).
 */
export async function sendFile(res: ServerResponse, path: string, file: GuestFile): Promise<void> {
  const base = path.slice(path.lastIndexOf('/') + 1) || 'download';
  res.writeHead(200, {
    'content-type': 'application/octet-stream',
    'content-disposition': attachmentDisposition(base),
    ...(file.size !== undefined ? { 'content-length': file.size } : {}),
  });
  try {
    for await (const b of file.chunks()) await writeRespectingBackpressure(res, b);
    res.end();
  } catch (e) {
    res.destroy(e as Error);
  } finally {
    file.close();
  }
}
