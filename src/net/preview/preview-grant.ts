import { createHmac, timingSafeEqual } from 'node:crypto';

/**
 * A preview grant: what the preview cookie holds instead of the user's JWT. It names one user,
 * one machine (by id) and one port, the token it was made from (so revoking the token kills the
 * grant) and an expiry no later than the token's. Signed with HMAC-SHA256 under a secret of its
 * own, so nothing that accepts a JWT (every API route) can mistake a grant for one, and a grant
 * leaked from a preview page opens that one port and nothing else.
 */
export interface PreviewGrant {
  /** The user whose machine it is. */
  user: string;
  machine: string;
  port: number;
  /** The token it was made from: checked live on every use. */
  jti: string;
  /** Unix seconds. */
  expiresAt: number;
}

/** The preview cookie's name; a guest may neither read nor set it. */
export const previewCookieName = 'hutch_preview';

const version = 'g1';

export class PreviewGrants {
  constructor(private readonly secret: Buffer) {}

  issue(g: PreviewGrant): string {
    const body = Buffer.from(JSON.stringify([g.user, g.machine, g.port, g.jti, g.expiresAt])).toString(
      'base64url',
    );
    return `${version}.${body}.${this.sign(body)}`;
  }

  /** The grant a cookie value holds when its signature is ours and it has not expired. */
  verify(value: string, nowSeconds = Math.floor(Date.now() / 1000)): PreviewGrant | undefined {
    // Bounded before any work: a cookie is client input of any size.
    if (value.length > 1024) return undefined;
    const [v, body, sig, extra] = value.split('.');
    if (v !== version || body === undefined || sig === undefined || extra !== undefined) return undefined;
    const want = Buffer.from(this.sign(body));
    const got = Buffer.from(sig);
    if (want.length !== got.length || !timingSafeEqual(want, got)) return undefined;
    let parsed: unknown;
    try {
      parsed = JSON.parse(Buffer.from(body, 'base64url').toString('utf8'));
    } catch {
      return undefined;
    }
    if (!Array.isArray(parsed) || parsed.length !== 5) return undefined;
    const [user, machine, port, jti, expiresAt] = parsed as unknown[];
    if (
      typeof user !== 'string' ||
      typeof machine !== 'string' ||
      typeof port !== 'number' ||
      typeof jti !== 'string' ||
      typeof expiresAt !== 'number'
    )
      return undefined;
    if (expiresAt <= nowSeconds) return undefined;
    return { user, machine, port, jti, expiresAt };
  }

  private sign(body: string): string {
    return createHmac('sha256', this.secret).update(`${version}.${body}`).digest('base64url');
  }
}

/** The values of every cookie named `name` in a Cookie header (a browser may send several). */
export function cookieValues(header: string | undefined, name: string): string[] {
  if (!header) return [];
  const out: string[] = [];
  for (const part of header.split(';')) {
    const i = part.indexOf('=');
    if (i < 0) continue;
    if (part.slice(0, i).trim() === name) out.push(part.slice(i + 1).trim());
  }
  return out;
}

/** A Cookie header without the cookies named `name`; undefined when nothing is left. */
export function withoutCookie(header: string | undefined, name: string): string | undefined {
  if (!header) return undefined;
  const kept = header
    .split(';')
    .map((p) => p.trim())
    .filter((p) => p !== '' && (p.indexOf('=') < 0 ? p : p.slice(0, p.indexOf('=')).trim()) !== name);
  return kept.length ? kept.join('; ') : undefined;
}
