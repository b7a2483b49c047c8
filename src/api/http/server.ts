import { rmSync } from 'node:fs';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { type WebSocket, WebSocketServer } from 'ws';
import { fromWebPage } from '../../auth/listener-policy.js';
import type { Principal } from '../../core/principal.js';
import { HutchError, toHutchError } from '../../errors.js';
import { encodeEvent, writeRespectingBackpressure } from '../exec-stream.js';
import { compileRoutes, matchRoute, requestUrl } from './match.js';
import {
  createGuardedServer,
  defaultRequestLimits,
  type RequestLimits,
  type TlsFiles,
} from './request-guard.js';
import { readJson, rejectUpgrade, sendError, sendResult } from './respond.js';
import { type ApiRoute, type NdjsonWriter, parseWith, type RequestParts } from './routes.js';
import { checkHandshake, closeCodes } from './websocket.js';

/**
 * The one HTTP server of hutch: a route table (routes.ts) and what its handlers get (`app`),
 * served on any number of listeners (TCP, Unix socket) with the same matching, validation, error
 * answers, request guard (request-guard.ts) and WebSocket upgrades.
 */
export interface ApiServer {
  /**
   * Listens on TCP (HTTPS with `tls`); resolves to the base URL. Requests without an
   * `authorization` header act as `anonymous()` when given, and are refused (401) when not.
   */
  listenTcp(host: string, port: number, anonymous?: () => Principal, tls?: TlsFiles): Promise<string>;
  /** Listens on a Unix socket created owner-only (its permissions are the credential); resolves to `unix:<path>`. */
  listenUnix(path: string, anonymous: () => Principal): Promise<string>;
  /**
   * Serves HTTP on a stream that is not a listener's (a guest's API tunnel): every request on it
   * without a bearer token acts as `principal`.
   */
  acceptConnection(stream: Duplex, principal: Principal): void;
  readonly servers: Server[];
  /** Closes every listener and connection; WebSockets get 1001 (then are cut after 1 s). */
  close(): Promise<void>;
}

export interface ApiServerOptions {
  limits?: RequestLimits | undefined;
  /** Served at GET /openapi.json when given. */
  openapi?: string;
  /**
   * Turns an `authorization` header into a principal; throws UNAUTHENTICATED for a bad one.
   * A request that carries a header is never treated as anonymous, whatever the listener.
   */
  verifyBearer(authorization: string): Promise<Principal>;
  /**
   * Offered every request and upgrade before the routes (the web previews, net/preview/): what
   * it takes, it answers, whatever the path.
   */
  front?: FrontHandler | undefined;
}

/** Whom a request without a bearer token is for on its listener (or tunnel); undefined: nobody. */
export type RequestPrincipal = (req: IncomingMessage) => Principal | undefined;
type Anonymous = RequestPrincipal;

/** Something served in front of a route table (see ApiServerOptions.front). */
export interface FrontHandler {
  /** True when it took the request (and answers it). */
  request(req: IncomingMessage, res: ServerResponse, anonymous: RequestPrincipal): boolean;
  /** True when it took the upgrade (and answers it, or pipes it). */
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer, anonymous: RequestPrincipal): boolean;
  /** The server is closing: end what it holds that the server cannot see (upgraded sockets). */
  close(): void;
}

const noop = (): void => {};

/**
 * `appFor(principal)` is what a route's handler gets (its API's actions bound to the caller);
 * `appFor(null)` for `public` routes, which run before anyone is authenticated.
 */
export function createApiServer<A extends object>(
  routes: ApiRoute<A>[],
  appFor: (principal: Principal | null) => A,
  opts: ApiServerOptions,
): ApiServer {
  const compiled = compileRoutes(routes);
  const upgrades = compileRoutes(routes.filter((r) => r.kind === 'websocket'));
  const wss = new WebSocketServer({ noServer: true, maxPayload: 1024 * 1024 });
  const servers: Server[] = [];
  const sockets = new Set<string>();
  let closed = false;

  /** Path parameters, the query and the body, each checked by the route's schemas. */
  async function parts(
    route: ApiRoute<A>,
    params: Record<string, string>,
    url: URL,
    req: IncomingMessage,
  ): Promise<RequestParts<unknown, unknown>> {
    const query = route.query
      ? parseWith(route.query, Object.fromEntries(url.searchParams), 'query')
      : undefined;
    // An absent body is an empty object: routes whose fields are all optional take none.
    const body = route.body
      ? parseWith(route.body, (await readJson(req, route.maxBodyBytes)) ?? {})
      : undefined;
    return { params, query, body, req };
  }

  /**
   * The caller: the `authorization` header, else (WebSocket upgrades only: browsers cannot set
   * headers on a WebSocket) a `?token=<JWT>` verified exactly like a bearer token, else the
   * listener's anonymous principal unless a web page sent the request (`fromWebPage`), else 401.
   */
  async function principalOf(req: IncomingMessage, anonymous: Anonymous, upgrade?: URL): Promise<Principal> {
    const h = req.headers.authorization;
    if (h !== undefined) return opts.verifyBearer(h);
    const token = upgrade?.searchParams.get('token');
    if (token !== undefined && token !== null) return opts.verifyBearer(`Bearer ${token}`);
    const p = anonymous(req);
    if (p) {
      if (!fromWebPage(req)) return p;
      throw new HutchError(
        'UNAUTHENTICATED',
        'a request from a web page (it has an Origin or a Sec-Fetch-Site header) needs a bearer token or ?token= even on this listener: a page must not act as its token-less admin',
      );
    }
    throw new HutchError(
      'UNAUTHENTICATED',
      'this listener requires a bearer token: exchange an API key at POST /api/v1/auth/token and send "authorization: Bearer <token>"',
    );
  }

  async function appOf(
    route: ApiRoute<A>,
    req: IncomingMessage,
    anonymous: Anonymous,
    upgrade?: URL,
  ): Promise<A> {
    return appFor(route.public ? null : await principalOf(req, anonymous, upgrade));
  }

  async function handle(req: IncomingMessage, res: ServerResponse, anonymous: Anonymous): Promise<void> {
    if (opts.front?.request(req, res, anonymous)) return;
    let shape: ApiRoute<A>['errorShape'];
    try {
      const url = requestUrl(req.url);
      const method = req.method ?? 'GET';
      if (opts.openapi !== undefined && method === 'GET' && url.pathname === '/openapi.json') {
        res.writeHead(200, { 'content-type': 'application/json' }).end(opts.openapi);
        return;
      }
      const m = matchRoute(compiled, method, routePath(url));
      if (m === 'method')
        throw new HutchError('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${url.pathname}`);
      if (!m) throw new HutchError('ROUTE_NOT_FOUND', `no endpoint ${req.method} ${url.pathname}`);
      const { route } = m;
      shape = route.errorShape;
      if (route.kind === 'websocket')
        throw new HutchError(
          'UPGRADE_REQUIRED',
          `${url.pathname} is a WebSocket endpoint: upgrade to websocket`,
        );
      const app = await appOf(route, req, anonymous);
      const ctx = { ...app, ...(await parts(route, m.params, url, req)) };
      const abort = new AbortController();
      res.on('close', () => {
        if (!res.writableFinished) abort.abort();
      });
      const stream = { res, signal: abort.signal };
      switch (route.kind) {
        case 'json':
          await sendResult(res, route.status, await route.handle({ ...ctx, signal: abort.signal }));
          return;
        case 'raw': {
          const result = await route.handle({ ...ctx, ...stream });
          if (!res.headersSent && !res.destroyed) await sendResult(res, route.status, result);
          return;
        }
        case 'ndjson': {
          const ndjson = (): NdjsonWriter => {
            res.writeHead(route.status, {
              'content-type': 'application/x-ndjson',
              'cache-control': 'no-store',
              'x-content-type-options': 'nosniff',
            });
            res.flushHeaders();
            return (event) => writeRespectingBackpressure(res, encodeEvent(event as never));
          };
          await route.handle({ ...ctx, ...stream, ndjson });
          if (!res.writableEnded && !res.destroyed) res.end();
          return;
        }
        case 'sse': {
          const events = await route.handle(ctx);
          // Keep-alive is node's to say (HTTP/1.1 keeps the connection open by default).
          res.writeHead(route.status, {
            'content-type': 'text/event-stream',
            'cache-control': 'no-cache',
            'x-accel-buffering': 'no',
          });
          res.flushHeaders();
          try {
            for await (const e of events) {
              if (abort.signal.aborted) break;
              await writeRespectingBackpressure(
                res,
                `event: ${e.event}\ndata: ${JSON.stringify(e.data)}\n\n`,
              );
            }
          } catch {
            // The client went away: nothing to say to it.
          } finally {
            await events.return(undefined);
            res.end();
          }
          return;
        }
      }
    } catch (e) {
      const err = toHutchError(e);
      if (err.code === 'INTERNAL') console.error('internal error:', e);
      if (res.headersSent) res.destroy();
      else if (req.complete) sendError(res, err, { shape });
      // A body we did not read (a refused upload): up to a little more of it is read and dropped
      // first, so a client still sending a small one gets the answer rather than a broken pipe;
      // past that bound the connection closes instead.
      // By the time the body is drained, what failed may have answered after all (a stream
      // handler that wrote its own reply): then there is nothing left to say.
      else
        drainThen(req, () => {
          if (!res.headersSent && !res.destroyed) sendError(res, err, { close: !req.complete, shape });
        });
    }
  }

  function onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, anonymous: Anonymous): void {
    socket.on('error', noop);
    if (!closed && opts.front?.upgrade(req, socket, head, anonymous)) return;
    let accepted = false;
    const run = async (): Promise<void> => {
      if (closed) throw new HutchError('AGENT_UNAVAILABLE', 'the server is stopping');
      const url = requestUrl(req.url);
      const m = matchRoute(upgrades, 'GET', routePath(url));
      if (!m || m === 'method')
        throw new HutchError('ROUTE_NOT_FOUND', `no WebSocket endpoint ${url.pathname}`);
      if (req.method !== 'GET')
        throw new HutchError('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${url.pathname}`);
      checkHandshake(req);
      const route = m.route;
      if (route.kind !== 'websocket') return;
      const app = await appOf(route, req, anonymous, url);
      const accept = (): Promise<WebSocket> =>
        new Promise<WebSocket>((resolve, reject) => {
          if (!socket.readable || !socket.writable) {
            reject(new Error('the client went away before the upgrade'));
            return;
          }
          accepted = true;
          wss.handleUpgrade(req, socket, head, (ws) => resolve(ws));
        });
      await route.handle({ ...app, ...(await parts(route, m.params, url, req)), accept });
    };
    run().catch((e: unknown) => {
      if (accepted) {
        console.error('websocket channel error:', e);
        return;
      }
      const err = toHutchError(e);
      if (err.code === 'INTERNAL') console.error('websocket channel error:', e);
      rejectUpgrade(socket, err);
    });
  }

  const make = (anonymous: Anonymous, tls?: TlsFiles): Server => {
    const s = createGuardedServer(
      opts.limits ?? defaultRequestLimits,
      (req, res) => {
        void handle(req, res, anonymous);
      },
      tls,
    );
    s.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) =>
      onUpgrade(req, socket, head, anonymous),
    );
    servers.push(s);
    return s;
  };
  // Tunnelled connections (guests' API streams) share one server that listens nowhere; each
  // stream's principal is looked up by its socket.
  const tunnelled = new WeakMap<object, Principal>();
  let tunnelServer: Server | undefined;
  const listen = (s: Server, ...args: [string] | [number, string]): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(...(args as [number, string]), () => resolve());
    });

  return {
    servers,
    async listenTcp(host, port, anonymous, tls) {
      const s = make(() => anonymous?.(), tls);
      await listen(s, port, host);
      const addr = s.address() as AddressInfo;
      const scheme = tls ? 'https' : 'http';
      return `${scheme}://${addr.family === 'IPv6' ? `[${addr.address}]` : addr.address}:${addr.port}`;
    },
    async listenUnix(path, anonymous) {
      rmSync(path, { force: true });
      const s = make(() => anonymous());
      // Owner-only from the start (no window with wider permissions): whoever can open the
      // socket has full control.
      const old = process.umask(0o177);
      try {
        await listen(s, path);
      } finally {
        process.umask(old);
      }
      sockets.add(path);
      return `unix:${path}`;
    },
    acceptConnection(stream, principal) {
      if (closed) {
        stream.destroy();
        return;
      }
      tunnelServer ??= make((req) => tunnelled.get(req.socket));
      tunnelled.set(stream, principal);
      tunnelServer.emit('connection', stream);
    },
    async close() {
      closed = true;
      opts.front?.close();
      for (const ws of wss.clients) ws.close(closeCodes.goingAway, 'the server is stopping');
      const t = setTimeout(() => {
        for (const ws of wss.clients) ws.terminate();
      }, 1000);
      t.unref();
      wss.close();
      await Promise.all(
        servers.map(
          (s) =>
            new Promise<void>((resolve) => {
              s.close(() => resolve());
              s.closeAllConnections();
            }),
        ),
      );
      for (const path of sockets) rmSync(path, { force: true });
    },
  };
}

/**
 * The path routes are matched against: `%3A` is a ":" (clients encode the custom methods of
 * `/v1/boxes/{id}:stop`), which no id or name contains.
 */
function routePath(url: URL): string {
  return url.pathname.replace(/%3a/gi, ':');
}

/** Reads and drops what is left of a request body, at most 1 MiB or 2 s, then calls `then` once. */
function drainThen(req: IncomingMessage, then: () => void): void {
  let left = 1024 * 1024;
  let done = false;
  const finish = (): void => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    req.off('data', onData);
    req.off('end', finish);
    req.pause();
    then();
  };
  const onData = (c: Buffer): void => {
    left -= c.length;
    if (left < 0) finish();
  };
  const timer = setTimeout(finish, 2000);
  req.unpipe();
  req.on('data', onData);
  req.once('end', finish);
  req.once('close', finish);
  req.resume();
}
