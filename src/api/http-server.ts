import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import { HeldText } from '../engine/output-budget.js';
import { errorTable, HutchError, toHutchError } from '../errors.js';
import { StalledReaderError, writeRespectingBackpressure } from './exec-stream.js';
import { openApiDocument } from './openapi.js';
import { createGuardedServer, defaultRequestLimits, type RequestLimits } from './request-guard.js';
import { compileRoutes, matchRoute, requestUrl } from './route-match.js';
import { machineChannelRoutes, machineRoutes, machineStreamRoutes, type StreamRoute } from './routes.js';
import { createUpgradeRouter } from './ws-upgrade.js';

const maxBodyBytes = 1024 * 1024;

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

/**
 * sendJson for a route's result, which may carry held exec output (HeldText): then the reply
 * is written a piece at a time as the client takes it, never as one string (a 32 MiB binary
 * output decodes and escapes to several times that), and the output's budget is given back
 * once it is written or the client has gone. Same bytes as JSON.stringify of the result.
 */
/** How long a buffered reply waits for a client that reads nothing before cutting it off. */
const replyStallMs = 30_000;

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

export function sendError(res: ServerResponse, e: HutchError): void {
  const body: Record<string, unknown> = { code: e.code, message: e.message };
  if (e.details) Object.assign(body, e.details);
  sendJson(res, errorTable[e.code].http, body);
}

/** Reads a JSON body whatever its content-type (curl -d sends form encoding by default). */
export async function readJson(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > maxBodyBytes)
        throw new HutchError('BODY_TOO_LARGE', `request body over ${maxBodyBytes} bytes`);
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

export interface HttpApi {
  server: Server;
  url: string;
  close(): Promise<void>;
}

export async function startHttpApi(
  engine: Engine,
  opts: { host: string; port: number; act: Actions; limits?: RequestLimits },
): Promise<HttpApi> {
  const routes = compileRoutes(machineRoutes);
  const streamRoutes = compileRoutes<StreamRoute>(machineStreamRoutes);
  const openapi = JSON.stringify(openApiDocument());
  // The one upgrade router of this server: every surface's WebSocket channels go in this list.
  const upgrades = createUpgradeRouter(
    machineChannelRoutes.map((r) => ({
      path: r.path,
      handle: (ctx) => r.handle({ ...ctx, engine, act: opts.act }),
    })),
    { onError: (e) => console.error('websocket channel error:', e) },
  );
  const server = createGuardedServer(opts.limits ?? defaultRequestLimits, (req, res) => {
    void handle(req, res);
  });
  server.on('upgrade', (req, socket, head) => upgrades.onUpgrade(req, socket, head));
  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const url = requestUrl(req.url);
      if (req.method === 'GET' && url.pathname === '/openapi.json') {
        res.writeHead(200, { 'content-type': 'application/json' }).end(openapi);
        return;
      }
      const method = req.method ?? 'GET';
      const stream = matchRoute(streamRoutes, method, url.pathname);
      if (stream && stream !== 'method') {
        const body = stream.route.body ? await readJson(req) : undefined;
        const result = await stream.route.handle({
          engine,
          act: opts.act,
          params: stream.params,
          query: url.searchParams,
          body,
          req,
          res,
        });
        if (!res.headersSent && !res.destroyed) sendJson(res, stream.route.status, result);
        return;
      }
      if (!stream && upgrades.matches(url.pathname)) {
        if (method !== 'GET')
          throw new HutchError('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${url.pathname}`);
        throw new HutchError(
          'UPGRADE_REQUIRED',
          `${url.pathname} is a WebSocket endpoint: upgrade to websocket`,
        );
      }
      const plain = matchRoute(routes, method, url.pathname);
      if (plain && plain !== 'method') {
        const body = plain.route.body ? await readJson(req) : undefined;
        const result = await plain.route.handle({ engine, act: opts.act, params: plain.params, body });
        await sendResult(res, plain.route.status, result);
        return;
      }
      if (stream === 'method' || plain === 'method')
        throw new HutchError('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${url.pathname}`);
      throw new HutchError('ROUTE_NOT_FOUND', `no endpoint ${req.method} ${url.pathname}`);
    } catch (e) {
      const err = toHutchError(e);
      if (err.code === 'INTERNAL') console.error('internal error:', e);
      // A body we did not read (a refused upload) is not drained: the connection closes instead.
      if (!req.complete && !res.headersSent) res.setHeader('connection', 'close');
      if (!res.headersSent) sendError(res, err);
      else res.destroy();
    }
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  return {
    server,
    url: `http://${host}:${addr.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        upgrades.close();
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
