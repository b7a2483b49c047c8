import {
  createServer,
  type IncomingMessage,
  type RequestListener,
  type Server,
  type ServerOptions,
  type ServerResponse,
} from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import type { Duplex } from 'node:stream';
import { HutchError } from '../../errors.js';
import { rejectUpgrade, sendError } from './respond.js';

/**
 * What every HTTP server of hutch (the machines API, the boxes API on its socket and on TCP)
 * does about clients that hold a connection without finishing their request: one mechanism for
 * all of them.
 *
 * A total request timeout does not fit: creates boot for long, exec streams and SSE last as long
 * as the command, and uploads may be large. What is never legitimate is a body that stops coming
 * while the handler is reading it: that is cut off after `bodyIdleTimeoutMs` (408). Headers have
 * to arrive whole within the same time. Past `maxConnections` open connections, new ones are
 * closed as soon as they are accepted.
 */
export interface RequestLimits {
  /** A body that sends no byte for this long while the handler is reading it is cut off. */
  bodyIdleTimeoutMs: number;
  /** Connections one server keeps open at once (upgraded ones included). */
  maxConnections: number;
}

export const defaultRequestLimits: RequestLimits = { bodyIdleTimeoutMs: 30_000, maxConnections: 1024 };

/** A certificate chain and its key (PEM): the listener speaks HTTPS. */
export interface TlsFiles {
  cert: Buffer;
  key: Buffer;
}

/** An http.Server (https with `tls`) for `handler` with the limits applied (see RequestLimits). */
export function createGuardedServer(limits: RequestLimits, handler: RequestListener, tls?: TlsFiles): Server {
  const idle = limits.bodyIdleTimeoutMs;
  const options: ServerOptions = {
    // 0: never cut a request for its total duration (see above); headers are bounded below.
    requestTimeout: 0,
    headersTimeout: idle,
    // How often node checks headersTimeout; by default 30 s, coarser than a short limit.
    connectionsCheckingInterval: Math.max(100, Math.min(30_000, Math.floor(idle / 2))),
    // Node's own refusal is a bare 400; a Host header means nothing to a local API anyway.
    requireHostHeader: false,
  };
  const guarded: RequestListener = (req, res) => {
    // A body coding other than chunked (gzip, …) would reach a handler as bytes it cannot read,
    // or, empty, look like no body at all: refused before any route sees it.
    const te = req.headers['transfer-encoding'];
    if (te !== undefined && te.trim().toLowerCase() !== 'chunked') {
      sendError(
        res,
        new HutchError(
          'INVALID_ARGUMENT',
          `transfer-encoding ${JSON.stringify(te)} is not accepted: send the body as is or chunked`,
        ),
        { close: true },
      );
      return;
    }
    watchBody(req, res, idle);
    handler(req, res);
  };
  const server: Server = tls
    ? createTlsServer({ ...options, cert: tls.cert, key: tls.key }, guarded)
    : createServer(options, guarded);
  server.maxConnections = limits.maxConnections;
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => answerClientError(err, socket));
  // An Expect other than 100-continue: node would answer a bare 417.
  server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) =>
    answer(
      res,
      new HutchError('INVALID_ARGUMENT', `unsupported Expect: ${JSON.stringify(req.headers.expect)}`),
    ),
  );
  // CONNECT: node would drop the connection without a word.
  server.on('connect', (_req: IncomingMessage, socket: Duplex) => {
    socket.on('error', () => {});
    rejectUpgrade(socket, new HutchError('METHOD_NOT_ALLOWED', 'CONNECT is not served: this is not a proxy'));
  });
  return server;
}

/**
 * Cuts a request off once its body has stalled: not complete, nothing buffered that the handler
 * has yet to read (so a handler that reads slowly, e.g. an upload waiting for the guest, never
 * counts against the client), not given up by the handler, no answer being streamed meanwhile (a
 * handler that answers without reading the body is not waiting for it), and no byte received on
 * the connection for `idleMs`.
 */
function watchBody(req: IncomingMessage, res: ServerResponse, idleMs: number): void {
  const h = req.headers;
  if (h['transfer-encoding'] === undefined && (h['content-length'] ?? '0') === '0') return;
  const socket = req.socket;
  let seen = socket.bytesRead;
  let since = Date.now();
  const timer = setInterval(
    () => {
      // A destroyed request is a handler that gave up on the body (over a limit, say) and may
      // take its time to answer: nothing is waiting for the client any more.
      if (req.complete || req.destroyed || socket.destroyed) {
        clearInterval(timer);
        return;
      }
      const now = Date.now();
      const answering = res.headersSent && !res.writableFinished;
      if (socket.bytesRead !== seen || req.readableLength > 0 || answering) {
        seen = socket.bytesRead;
        since = now;
        return;
      }
      if (now - since < idleMs) return;
      clearInterval(timer);
      cutOff(req, res, idleMs);
    },
    Math.max(50, Math.min(1000, Math.floor(idleMs / 4))),
  );
  timer.unref();
}

function cutOff(req: IncomingMessage, res: ServerResponse, idleMs: number): void {
  // The request itself is destroyed, not only its socket: once the answer is out node no
  // longer aborts the request when its socket closes, and a handler reading the body would wait
  // for ever. Its read fails instead, and it ends.
  // The socket is taken now: node detaches it from the request once the answer has finished,
  // and `finish` and `close` both come after that.
  const socket = req.socket;
  let closed = false;
  const close = (): void => {
    if (closed) return;
    closed = true;
    req.destroy();
    socket.destroy();
  };
  if (res.headersSent || res.writableEnded) {
    close();
    return;
  }
  res.once('finish', close);
  res.once('close', close);
  answer(
    res,
    new HutchError(
      'REQUEST_TIMEOUT',
      `the request body stopped arriving: no byte for ${Math.round(idleMs / 100) / 10} s`,
    ),
  );
}

/**
 * Node's answer to a request it could not parse (bad request line or header, headers too large,
 * headers too slow), in the error format of every other answer rather than a bare status line.
 */
function answerClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  const inFlight = (socket as Duplex & { _httpMessage?: ServerResponse | null })._httpMessage;
  if (err.code === 'ECONNRESET' || inFlight?.headersSent) {
    socket.destroy();
    return;
  }
  rejectUpgrade(
    socket,
    err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
      ? new HutchError('REQUEST_TIMEOUT', 'the request headers did not arrive in time')
      : err.code === 'HPE_HEADER_OVERFLOW'
        ? new HutchError('INVALID_ARGUMENT', 'the request line and headers are over 16 KiB')
        : new HutchError('INVALID_ARGUMENT', `malformed HTTP request (${err.code ?? err.message})`),
  );
}

/** Sends a JSON error on a response that the handler will not get to, and closes. */
function answer(res: ServerResponse, e: HutchError): void {
  sendError(res, e, { close: true });
}
