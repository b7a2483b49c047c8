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
