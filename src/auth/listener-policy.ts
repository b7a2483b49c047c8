import type { IncomingMessage } from 'node:http';
import { isIPv4, isIPv6 } from 'node:net';
import type { Principal } from '../core/principal.js';
import type { AuthService } from './auth-service.js';

/** Whether `host` (a listen address) can only be reached from this machine. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '');
  if (h === 'localhost') return true;
  if (isIPv4(h)) return h.startsWith('127.');
  if (isIPv6(h)) return h === '::1' || /^::ffff:127\./i.test(h);
  return false;
}

/**
 * Whom a token-less REST request on a TCP listener at `host` acts as: the local admin on a
 * loopback address (so the documented curl examples work on a fresh install) unless
 * `requireAuth`; nobody (401) on any other address. `requireAuth: false` on a non-loopback
 * address is a configuration error: an open port must never make whoever reaches it the admin.
 */
export function anonymousFor(
  host: string,
  cfg: { requireAuth?: boolean | undefined; owner: string },
  auth: AuthService,
): (() => Principal) | undefined {
  const loopback = isLoopbackHost(host);
  if (!loopback && cfg.requireAuth === false)
    throw new Error(
      `refusing to listen on ${host} without authentication: HUTCH_REQUIRE_AUTH=0 is only allowed on loopback addresses`,
    );
  if (!loopback || cfg.requireAuth === true) return undefined;
  return () => auth.principalFor(cfg.owner, 'local');
}

/**
 * Whether a request was sent by a web page: a `Sec-Fetch-Site` other than `none` (`none` is the
 * user's own navigation: the address bar, a bookmark), or an `Origin` that is not the request's
 * own. Such a request never acts as a listener's token-less principal: any site the user visits,
 * and any guest page served as a path preview on the API's own origin, could otherwise drive the
 * API as the local admin. Browsers send `Sec-Fetch-Site` on every request (Chrome 76, Firefox 90,
 * Safari 16.4); curl, the CLI and SDKs send neither header, and the WebSocket clients that do send
 * an Origin (python's websocket-client) send the target's own.
 */
export function fromWebPage(req: IncomingMessage): boolean {
  const site = req.headers['sec-fetch-site'];
  if (site !== undefined) return site !== 'none';
  const origin = req.headers.origin;
  if (origin === undefined) return false;
  const host = req.headers.host;
  return host === undefined || (origin !== `http://${host}` && origin !== `https://${host}`);
}

/** Whether a request is a browser's top-level navigation the user made (address bar, bookmark). */
export function isUserNavigation(req: IncomingMessage): boolean {
  return req.headers['sec-fetch-site'] === 'none' && req.headers['sec-fetch-mode'] === 'navigate';
}
