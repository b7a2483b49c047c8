import { type ClientRequest, type IncomingMessage, request, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { TLSSocket } from 'node:tls';
import { requestUrl } from '../../api/http/match.js';
import { rejectUpgrade, sendError } from '../../api/http/respond.js';
import type { FrontHandler, RequestPrincipal } from '../../api/http/server.js';
import type { AuthService } from '../../auth/auth-service.js';
import { fromWebPage, isUserNavigation } from '../../auth/listener-policy.js';
import type { Principal } from '../../core/principal.js';
import { HutchError, toHutchError } from '../../errors.js';
import type { NetStore } from '../net-store.js';
import { cookieValues, PreviewGrants, previewCookieName } from './preview-grant.js';
import { clientResponseHeaders, type RewriteInfo, upstreamRequestHeaders } from './preview-headers.js';
import { type HostTarget, hostTarget, type PathTarget, pathTarget } from './preview-target.js';

/**
 * Web previews: HTTP (and any Upgrade) from the daemon's listener to a TCP port inside a machine,
 * streamed both ways (docs/previews.md). Mounted in front of the API's routes
 * (ApiServerOptions.front): it takes the preview paths, and with a public domain every Host
 * under it, so a page served from a preview origin never reaches an API route.
 */

/** A byte stream to 127.0.0.1:`port` inside the machine (Engine.openPort). */
export type PortOpener = (p: Principal, machineIdOrName: string, port: number) => Promise<Duplex>;

/** The TCP ports the machine listens on (Engine.listeningPorts). */
export type ListeningPorts = (p: Principal, machineIdOrName: string) => Promise<number[]>;

/** The caller's machine by id or name; another user's is MACHINE_NOT_FOUND (Engine.get). */
export type FindMachine = (p: Principal, idOrName: string) => { id: string };

export interface PreviewDeps {
  auth: Pick<AuthService, 'verifyBearer' | 'liveToken' | 'principalFor' | 'previewGrantSecret'>;
  net: NetStore;
  findMachine: FindMachine;
  /** Absent: previews answer NOT_SERVED. */
  openPort?: PortOpener | undefined;
  /** Absent: GET …/ports lists public ports only, and proxies on "port 0" find nothing. */
  listeningPorts?: ListeningPorts | undefined;
  /** Route by Host under this domain (config publicDomain); absent: paths only. */
  publicDomain?: string | undefined;
  /** Time from the request to the guest's response headers (or 101). */
  timeoutMs?: number | undefined;
}

export interface PreviewPort {
  port: number;
  public: boolean;
  url: string;
}

/** Where one request goes, and as whom. */
interface Upstream {
  principal: Principal;
  machine: string;
  port: number;
  /** Sent to the guest: the path and query. */
  path: string;
  /** X-Forwarded-Prefix, and what Location/Set-Cookie are moved under. */
  prefix: string;
  /** A Set-Cookie of hutch's own added to the guest's response (a local grant). */
  cookie?: string;
}

interface Redirect {
  location: string;
  status: number;
  cookie: string;
}

type Target = PathTarget | HostTarget | { kind: 'redirect'; location: string };

const noop = (): void => {};

export class PreviewProxy implements FrontHandler {
  private readonly grants: PreviewGrants;
  private readonly timeoutMs: number;
  /** Upgraded pairs: the server's close() does not reach sockets it has handed over. */
  private readonly tunnels = new Set<Duplex>();

  constructor(private readonly deps: PreviewDeps) {
    this.grants = new PreviewGrants(deps.auth.previewGrantSecret());
    this.timeoutMs = deps.timeoutMs ?? 60_000;
  }

  // ---- FrontHandler ----------------------------------------------------------------------------

  request(req: IncomingMessage, res: ServerResponse, anonymous: RequestPrincipal): boolean {
    let target: Target | undefined;
    try {
      target = this.targetOf(req);
    } catch (e) {
      sendError(res, toHutchError(e), { close: !req.complete });
      return true;
    }
    if (!target) return false;
    this.serve(req, res, target, anonymous).catch((e: unknown) => {
      const err = toHutchError(e);
      if (err.code === 'INTERNAL') console.error('preview error:', e);
      if (!res.headersSent) sendError(res, err, { close: !req.complete });
      else res.destroy();
    });
    return true;
  }

  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer, anonymous: RequestPrincipal): boolean {
    let target: Target | undefined;
    try {
      target = this.targetOf(req);
    } catch (e) {
      socket.on('error', noop);
      rejectUpgrade(socket, toHutchError(e));
      return true;
    }
    if (!target) return false;
    socket.on('error', noop);
    this.serveUpgrade(req, socket, head, target, anonymous).catch((e: unknown) => {
      const err = toHutchError(e);
      if (err.code === 'INTERNAL') console.error('preview upgrade error:', e);
      rejectUpgrade(socket, err);
    });
    return true;
  }

  close(): void {
    for (const s of this.tunnels) s.destroy();
    this.tunnels.clear();
  }

  // ---- the API's part (routes in api/preview-routes.ts) ------------------------------------------

  /** PUT /v1/machines/{id}/web/{port}/public: the owner opens or closes a port to everyone. */
  setPublic(
    p: Principal,
    idOrName: string,
    port: number,
    isPublic: boolean,
    req: IncomingMessage,
  ): PreviewPort {
    const { id } = this.deps.findMachine(p, idOrName);
    this.deps.net.setPublicPort(id, port, isPublic, p.user);
    return { port, public: isPublic, url: this.urlOf(req, id, port) };
  }

  /** GET /v1/machines/{id}/ports: what the guest listens on, and what is public. */
  async ports(p: Principal, idOrName: string, req: IncomingMessage): Promise<{ ports: PreviewPort[] }> {
    const { id } = this.deps.findMachine(p, idOrName);
    const listening = this.deps.listeningPorts ? await this.deps.listeningPorts(p, id) : [];
    const open = new Set(this.deps.net.publicPorts(id));
    const all = [...new Set([...listening, ...open])].sort((a, b) => a - b);
    return { ports: all.map((port) => ({ port, public: open.has(port), url: this.urlOf(req, id, port) })) };
  }

  /** Where a client that reached the API with `req` opens port `port` of machine `id` (the agents use it too). */
  urlOf(req: IncomingMessage, id: string, port: number): string {
    const proto = isTls(req) ? 'https' : 'http';
    const host = req.headers.host ?? 'localhost';
    const domain = this.deps.publicDomain;
    if (domain === undefined) return `${proto}://${host}/v1/machines/${id}/web/${port}/`;
    const listenPort = /:(\d+)$/.exec(host)?.[1];
    return `${proto}://${port}-${id}.${domain}${listenPort ? `:${listenPort}` : ''}/`;
  }

  // ---- routing and credentials ------------------------------------------------------------------

  private targetOf(req: IncomingMessage): Target | undefined {
    const domain = this.deps.publicDomain;
    if (domain !== undefined) {
      const t = hostTarget(req.headers.host, domain, (d) => this.deps.net.domain(d) !== undefined);
      if (t) return t;
    }
    const url = requestUrl(req.url);
    return pathTarget(req.method ?? 'GET', url.pathname, url.search);
  }

  /** The upstream of a target, or the redirect that trades a `?token=` for a grant cookie. */
  private async upstreamOf(
    req: IncomingMessage,
    target: PathTarget | HostTarget,
    anonymous: RequestPrincipal,
  ): Promise<Upstream | Redirect> {
    const url = requestUrl(req.url);
    const path = `${url.pathname}${url.search}`;
    switch (target.kind) {
      case 'path':
        return this.authorize(req, url, target.machine, target.port, anonymous, {
          path: target.path,
          prefix: target.prefix,
        });
      case 'port-host':
        return this.authorize(req, url, target.machine, target.port, anonymous, { path, prefix: '' });
      case 'proxy': {
        const row = this.deps.net.proxyByName(target.name);
        if (!row) throw new HutchError('PROXY_NOT_FOUND', `no preview or proxy at ${target.name}`);
        return this.publicUpstream(row.owner, row.machine_id, row.port, path);
      }
      case 'domain': {
        const row = this.deps.net.domain(target.domain);
        if (!row) throw new HutchError('DOMAIN_NOT_FOUND', `no domain ${target.domain}`);
        return this.publicUpstream(row.owner, row.machine_id, row.port, path);
      }
    }
  }

  /**
   * Proxies and bound domains: their URL is the credential, so they act as the owner. Port 0 is
   * the first port the guest listens on, looked up now.
   */
  private async publicUpstream(
    owner: string,
    machine: string,
    port: number,
    path: string,
  ): Promise<Upstream> {
    // The daemon acts for the owner here, as it does for the loopback admin: 'local'.
    const principal = this.deps.auth.principalFor(owner, 'local');
    let p = port;
    if (p === 0) {
      const listening = this.deps.listeningPorts ? await this.deps.listeningPorts(principal, machine) : [];
      const first = [...listening].sort((a, b) => a - b)[0];
      if (first === undefined)
        throw new HutchError('PORT_NOT_LISTENING', `nothing in machine ${machine} listens on a TCP port`);
      p = first;
    }
    return { principal, machine, port: p, path, prefix: '' };
  }

  /**
   * Who a preview of (machine, port) acts as: a `?token=` (traded for a grant cookie by a
   * redirect), a public port (its owner), a bearer token, a grant for exactly this machine and
   * port whose token still works, the listener's anonymous principal; else 401. Another user's
   * machine is 404 whatever the credential.
   */
  private async authorize(
    req: IncomingMessage,
    url: URL,
    ref: string,
    port: number,
    anonymous: RequestPrincipal,
    at: { path: string; prefix: string },
  ): Promise<Upstream | Redirect> {
    const { auth, findMachine, net } = this.deps;
    const token = url.searchParams.get('token');
    if (token !== null) return this.grantRedirect(req, url, token, ref, port, `${at.prefix}/`);
    const upstream = (principal: Principal, machine: string): Upstream => ({
      principal,
      machine,
      port,
      ...at,
    });
    const owner = net.publicPortOwner(ref, port);
    if (owner !== undefined) return upstream(auth.principalFor(owner, 'local'), ref);
    if (req.headers.authorization !== undefined) {
      const p = await auth.verifyBearer(req.headers.authorization);
      return upstream(p, findMachine(p, ref).id);
    }
    for (const value of cookieValues(req.headers.cookie, previewCookieName)) {
      const g = this.grants.verify(value);
      if (!g || g.port !== port) continue;
      let p: Principal;
      if (g.jti === localGrantJti) {
        // Good only where its user is still the listener's token-less admin: not on another
        // listener, not once the server requires tokens.
        const anon = anonymous(req);
        if (anon?.user !== g.user) continue;
        p = anon;
      } else {
        if (!auth.liveToken(g.jti, g.user)) continue;
        p = auth.principalFor(g.user, 'token', { jti: g.jti });
      }
      let id: string;
      try {
        id = findMachine(p, ref).id;
      } catch {
        continue;
      }
      if (id === g.machine) return upstream(p, id);
    }
    const anon = anonymous(req);
    if (anon && !fromWebPage(req)) {
      const id = findMachine(anon, ref).id;
      if (!isUserNavigation(req)) return upstream(anon, id);
      // A browser the user pointed here: the page's own requests come from a web page, so they
      // are not the admin's; they carry a grant for this one machine and port instead.
      const expiresAt = Math.floor(Date.now() / 1000) + localGrantSeconds;
      const grant = this.grants.issue({ user: anon.user, machine: id, port, jti: localGrantJti, expiresAt });
      return { ...upstream(anon, id), cookie: grantCookie(req, grant, `${at.prefix}/`, localGrantSeconds) };
    }
    throw new HutchError(
      'UNAUTHENTICATED',
      anon
        ? 'a request from a web page needs a preview grant: open the preview itself in the browser first, or with ?token=<JWT>'
        : 'this preview needs credentials: open it once with ?token=<JWT>, or send "authorization: Bearer <token>"',
    );
  }

  /**
   * `?token=`: verified like a bearer token, then answered with a redirect to the same URL
   * without it and a cookie holding a grant (never the JWT: a guest page's script and the
   * guest's logs must not get the user's API token).
   */
  private async grantRedirect(
    req: IncomingMessage,
    url: URL,
    token: string,
    ref: string,
    port: number,
    cookiePath: string,
  ): Promise<Redirect> {
    const { auth, findMachine } = this.deps;
    const p = await auth.verifyBearer(`Bearer ${token}`);
    const { id } = findMachine(p, ref);
    const live = p.jti === undefined ? undefined : auth.liveToken(p.jti, p.user);
    if (!live || p.jti === undefined) throw new HutchError('UNAUTHENTICATED', 'the token no longer works');
    const grant = this.grants.issue({
      user: p.user,
      machine: id,
      port,
      jti: p.jti,
      expiresAt: live.expires_at,
    });
    const maxAge = Math.max(0, live.expires_at - Math.floor(Date.now() / 1000));
    const rest = new URLSearchParams(url.searchParams);
    rest.delete('token');
    const query = rest.toString();
    const method = req.method ?? 'GET';
    return {
      location: `${url.pathname}${query ? `?${query}` : ''}`,
      // A navigation becomes a GET; anything else is asked to repeat itself, body and all.
      status: method === 'GET' || method === 'HEAD' ? 303 : 307,
      cookie: grantCookie(req, grant, cookiePath, maxAge),
    };
  }

  // ---- forwarding -------------------------------------------------------------------------------

  private async serve(
    req: IncomingMessage,
    res: ServerResponse,
    target: Target,
    anonymous: RequestPrincipal,
  ): Promise<void> {
    if (target.kind === 'redirect') {
      res.writeHead(308, { location: target.location, 'content-length': 0 }).end();
      return;
    }
    const up = await this.upstreamOf(req, target, anonymous);
    if ('location' in up) {
      res.writeHead(up.status, {
        location: up.location,
        'set-cookie': up.cookie,
        'cache-control': 'no-store',
        'referrer-policy': 'no-referrer',
        'content-length': 0,
      });
      res.end();
      return;
    }
    const opened = await this.openFor(up, () => res.destroyed);
    if (!opened) return;
    const { stream, deadline } = opened;
    const upReq = upstreamRequest(req, up, stream);
    const info: RewriteInfo = { prefix: up.prefix, host: req.headers.host, port: up.port };
    res.on('close', () => {
      if (!res.writableFinished) upReq.destroy();
    });
    await new Promise<void>((resolve, reject) => {
      deadline.onExpiry(() => {
        upReq.destroy();
        reject(timeoutError(this.timeoutMs));
      });
      upReq.once('error', (e) => {
        deadline.clear();
        reject(upstreamError(e));
      });
      upReq.once('response', (upRes: IncomingMessage) => {
        deadline.clear();
        const headers = clientResponseHeaders(upRes.rawHeaders, info);
        if (up.cookie !== undefined) headers.push('set-cookie', up.cookie);
        res.writeHead(upRes.statusCode ?? 502, upRes.statusMessage, headers);
        // Headers go now: an event stream's client must not wait for a first chunk.
        res.flushHeaders();
        // A guest that breaks off mid-response: the client's connection is cut, never left hanging.
        pipeline(upRes, res).catch(() => res.destroy());
        resolve();
      });
      // The body streams as the guest takes it: pipe() holds the client back, not our memory.
      pipeline(req, upReq).catch(() => upReq.destroy());
    });
  }

  private async serveUpgrade(
    req: IncomingMessage,
    socket: Duplex,
    head: Buffer,
    target: Target,
    anonymous: RequestPrincipal,
  ): Promise<void> {
    if (target.kind === 'redirect') {
      writeHead(socket, 308, 'Permanent Redirect', ['location', target.location, 'content-length', '0']);
      socket.end();
      return;
    }
    const up = await this.upstreamOf(req, target, anonymous);
    if ('location' in up) {
      writeHead(socket, up.status, 'Redirect', [
        'location',
        up.location,
        'set-cookie',
        up.cookie,
        'cache-control',
        'no-store',
        'content-length',
        '0',
        'connection',
        'close',
      ]);
      socket.end();
      return;
    }
    const opened = await this.openFor(up, () => socket.destroyed);
    if (!opened) return;
    const { stream, deadline } = opened;
    const info: RewriteInfo = { prefix: up.prefix, host: req.headers.host, port: up.port };
    const upReq = upstreamRequest(req, up, stream);
    socket.once('close', () => upReq.destroy());
    await new Promise<void>((resolve, reject) => {
      deadline.onExpiry(() => {
        upReq.destroy();
        reject(timeoutError(this.timeoutMs));
      });
      upReq.once('error', (e) => {
        deadline.clear();
        reject(upstreamError(e));
      });
      upReq.once('upgrade', (upRes: IncomingMessage, upSocket: Duplex, upHead: Buffer) => {
        deadline.clear();
        resolve();
        upSocket.on('error', noop);
        if (socket.destroyed) {
          upSocket.destroy();
          return;
        }
        writeHead(
          socket,
          101,
          upRes.statusMessage ?? 'Switching Protocols',
          clientResponseHeaders(upRes.rawHeaders, info, true),
        );
        if (upHead.length) socket.write(upHead);
        if (head.length) upSocket.write(head);
        this.splice(socket, upSocket);
      });
      upReq.once('response', (upRes: IncomingMessage) => {
        // The guest declined the upgrade: its answer goes back as is, then the connection closes.
        deadline.clear();
        resolve();
        const headers = clientResponseHeaders(upRes.rawHeaders, info);
        writeHead(socket, upRes.statusCode ?? 502, upRes.statusMessage ?? '', [
          ...headers,
          'connection',
          'close',
        ]);
        pipeline(upRes, socket).catch(() => socket.destroy());
      });
      upReq.end();
    });
  }

  /** Two sockets piped raw, each holding the other back; either closing closes both. */
  private splice(a: Duplex, b: Duplex): void {
    this.tunnels.add(a);
    const end = (): void => {
      this.tunnels.delete(a);
      a.destroy();
      b.destroy();
    };
    a.once('close', end);
    b.once('close', end);
    a.once('error', end);
    b.once('error', end);
    a.pipe(b);
    b.pipe(a);
  }

  /**
   * The guest stream, opened within the deadline; undefined (the stream closed) when the client
   * left while it was being opened: nobody to answer.
   */
  private async openFor(
    up: Upstream,
    clientGone: () => boolean,
  ): Promise<{ stream: Duplex; deadline: Deadline } | undefined> {
    const deadline = new Deadline(this.timeoutMs);
    const stream = await deadline.race(this.open(up));
    if (!clientGone()) return { stream, deadline };
    deadline.clear();
    stream.destroy();
    return undefined;
  }

  private open(up: Upstream): Promise<Duplex> {
    const openPort = this.deps.openPort;
    if (!openPort)
      return Promise.reject(new HutchError('NOT_SERVED', 'web previews are not served by this daemon yet'));
    return openPort(up.principal, up.machine, up.port);
  }
}

/** One timer from the request to the guest's answer, across opening the stream and waiting. */
class Deadline {
  private timer: NodeJS.Timeout | undefined;
  private expired = false;
  private onExpire: (() => void) | undefined;

  constructor(private readonly ms: number) {
    this.timer = setTimeout(() => {
      this.expired = true;
      this.onExpire?.();
    }, ms);
  }

  /** `p`, unless the deadline passes first (then a stream it yields later is destroyed). */
  race(p: Promise<Duplex>): Promise<Duplex> {
    return new Promise((resolve, reject) => {
      this.onExpire = () => reject(timeoutError(this.ms));
      p.then(
        (s) => {
          if (this.expired) s.destroy();
          else resolve(s);
        },
        (e: unknown) => {
          this.clear();
          reject(e);
        },
      );
    });
  }

  onExpiry(fn: () => void): void {
    if (this.expired) fn();
    else this.onExpire = fn;
  }

  clear(): void {
    clearTimeout(this.timer);
    this.onExpire = undefined;
  }
}

function timeoutError(ms: number): HutchError {
  return new HutchError(
    'PREVIEW_TIMEOUT',
    `the server in the machine sent no response headers within ${Math.round(ms / 100) / 10} s`,
  );
}

function upstreamError(e: Error): HutchError {
  if (e instanceof HutchError) return e;
  return new HutchError(
    'PREVIEW_UPSTREAM_FAILED',
    `the server in the machine broke off before answering (${(e as NodeJS.ErrnoException).code ?? e.message})`,
  );
}

function isTls(req: IncomingMessage): boolean {
  return (req.socket as TLSSocket).encrypted === true;
}

/** A response head written on a bare socket (upgrades have no ServerResponse). */
function writeHead(socket: Duplex, status: number, reason: string, headers: string[]): void {
  let head = `HTTP/1.1 ${status} ${reason.replace(/[\r\n]/g, '')}\r\n`;
  for (let i = 0; i + 1 < headers.length; i += 2) head += `${headers[i]}: ${headers[i + 1]}\r\n`;
  socket.write(`${head}\r\n`);
}

/** The request to the guest, on the stream opened for it (requests and upgrades alike). */
function upstreamRequest(req: IncomingMessage, up: Upstream, stream: Duplex): ClientRequest {
  return request({
    method: req.method ?? 'GET',
    path: up.path,
    headers: upstreamRequestHeaders(req, {
      prefix: up.prefix,
      proto: isTls(req) ? 'https' : 'http',
    }).flat(),
    createConnection: () => stream,
  });
}

/** The `jti` of a grant made for a listener's token-less admin (no token behind it). */
const localGrantJti = '-local';
const localGrantSeconds = 12 * 3600;

function grantCookie(req: IncomingMessage, grant: string, path: string, maxAge: number): string {
  return (
    `${previewCookieName}=${grant}; Path=${path}; Max-Age=${maxAge}; HttpOnly; SameSite=Lax` +
    (isTls(req) ? '; Secure' : '')
  );
}
