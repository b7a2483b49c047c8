import type { IncomingHttpHeaders, IncomingMessage } from 'node:http';
import { previewCookieName, withoutCookie } from './preview-grant.js';

/**
 * Headers across the preview proxy, both ways. Requests lose what belongs to the hop (RFC 9110
 * §7.6.1) and every credential of hutch's (the guest must never see the user's API token or
 * grant); responses get their Location and Set-Cookie moved under the preview's prefix, so a
 * guest app written for `/` works under `/v1/machines/{id}/web/{port}/` and cannot plant cookies
 * on the API's paths.
 */

const hopByHop = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);

/**
 * Headers a client may not drop by naming them in `Connection` (the hop-by-hop trick): framing,
 * the host, and what the proxy itself vouches for.
 */
const neverHopByHop = new Set(['host', 'content-length', 'cookie']);

/** What the proxy sets itself: a client's own values are replaced (X-Forwarded-For is appended to). */
const ours = new Set([
  'authorization',
  'cookie',
  'x-forwarded-for',
  'x-forwarded-proto',
  'x-forwarded-host',
  'x-forwarded-prefix',
]);

export interface ForwardInfo {
  /** `/v1/machines/{id}/web/{port}`, or '' for host-routed previews. */
  prefix: string;
  proto: 'http' | 'https';
}

/** Header names listed in Connection: the sender's per-hop headers. */
function connectionTokens(h: IncomingHttpHeaders): Set<string> {
  const out = new Set<string>();
  for (const t of (h.connection ?? '').split(',')) if (t.trim() !== '') out.add(t.trim().toLowerCase());
  return out;
}

/**
 * The request headers for the guest, as [name, value] pairs in the client's order (duplicates
 * kept). An upgrade keeps its Connection/Upgrade pair; anything else is re-framed by node's
 * client (Content-Length when the client sent one, else chunked), so what the guest parses is
 * never ambiguous whatever the client sent.
 */
export function upstreamRequestHeaders(req: IncomingMessage, info: ForwardInfo): [string, string][] {
  const listed = connectionTokens(req.headers);
  const out: [string, string][] = [];
  const raw = req.rawHeaders;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i] as string;
    const lower = name.toLowerCase();
    if (hopByHop.has(lower) || ours.has(lower)) continue;
    if (listed.has(lower) && !neverHopByHop.has(lower) && !lower.startsWith('x-forwarded-')) continue;
    out.push([name, raw[i + 1] as string]);
  }
  const cookie = withoutCookie(req.headers.cookie, previewCookieName);
  if (cookie !== undefined) out.push(['cookie', cookie]);
  const peer = req.socket.remoteAddress ?? '';
  const prior = req.headers['x-forwarded-for'];
  out.push(['x-forwarded-for', prior ? `${prior}, ${peer}` : peer]);
  out.push(['x-forwarded-proto', info.proto]);
  if (req.headers.host !== undefined) out.push(['x-forwarded-host', req.headers.host]);
  out.push(['x-forwarded-prefix', info.prefix]);
  const upgrade = req.headers.upgrade;
  if (upgrade !== undefined) {
    out.push(['connection', 'upgrade']);
    out.push(['upgrade', upgrade]);
  }
  return out;
}

export interface RewriteInfo {
  prefix: string;
  /** The Host the client used (the guest sees it too). */
  host: string | undefined;
  /** The port inside the guest (`localhost:{port}` is the guest's own address too). */
  port: number;
}

/**
 * The response headers for the client as a flat [name, value, name, value…] list: hop-by-hop
 * ones dropped (kept for a 101, whose Connection/Upgrade are the point), Location and
 * Set-Cookie rewritten.
 */
export function clientResponseHeaders(rawHeaders: string[], info: RewriteInfo, upgrade = false): string[] {
  const out: string[] = [];
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const name = rawHeaders[i] as string;
    const value = rawHeaders[i + 1] as string;
    const lower = name.toLowerCase();
    if (!upgrade && hopByHop.has(lower)) continue;
    if (lower === 'location') out.push(name, rewriteLocation(value, info));
    else if (lower === 'set-cookie') {
      const c = rewriteSetCookie(value, info.prefix);
      if (c !== undefined) out.push(name, c);
    } else out.push(name, value);
  }
  return out;
}

/**
 * A Location the guest meant for its own root (`/x`, or an absolute URL at its own host: the
 * Host it was sent, or localhost/127.0.0.1) is moved under the prefix; relative ones already
 * resolve under it, and other sites' URLs are left alone.
 */
export function rewriteLocation(location: string, info: RewriteInfo): string {
  if (location.startsWith('/') && !location.startsWith('//')) return `${info.prefix}${location}`;
  let u: URL;
  try {
    u = new URL(location.startsWith('//') ? `http:${location}` : location);
  } catch {
    return location;
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') return location;
  const own = new Set(
    [
      info.host?.toLowerCase(),
      `localhost:${info.port}`,
      `127.0.0.1:${info.port}`,
      'localhost',
      '127.0.0.1',
    ].filter((h): h is string => h !== undefined),
  );
  if (!own.has(u.host.toLowerCase())) return location;
  return `${info.prefix}${u.pathname}${u.search}${u.hash}`;
}

/**
 * A guest's Set-Cookie, confined to its preview: Domain is dropped (it would reach sibling
 * previews and the API's host), Path is moved under the prefix (a cookie without one gets the
 * prefix's), and cookies named like hutch's own are dropped. Undefined: not forwarded.
 */
export function rewriteSetCookie(value: string, prefix: string): string | undefined {
  const parts = value.split(';');
  const pair = (parts[0] ?? '').trim();
  const eq = pair.indexOf('=');
  const name = (eq < 0 ? pair : pair.slice(0, eq)).trim();
  // Browsers treat the __Secure-/__Host- prefixes case-insensitively; so does this check.
  const bare = name.replace(/^__(secure|host)-/i, '').toLowerCase();
  if (bare === previewCookieName) return undefined;
  let path = '/';
  const attrs: string[] = [];
  for (const a of parts.slice(1)) {
    const t = a.trim();
    const key = t.split('=')[0]?.trim().toLowerCase() ?? '';
    if (key === 'domain') continue;
    if (key === 'path') {
      const v = t.slice(t.indexOf('=') + 1).trim();
      if (v.startsWith('/')) path = v;
      continue;
    }
    if (t !== '') attrs.push(t);
  }
  // A path with dot segments or escapes never matches a normalized request path under the prefix
  // the way it reads; refuse rather than guess what a browser makes of it.
  if (/(^|\/)\.\.?(\/|$)|%/.test(path)) return undefined;
  const scoped = prefix === '' ? path : `${prefix}${path}`;
  // A __Host- cookie must have Path=/; under a prefix it cannot be set at all, so it is dropped.
  if (/^__host-/i.test(name) && scoped !== '/') return undefined;
  return [pair, `Path=${scoped}`, ...attrs].join('; ');
}
