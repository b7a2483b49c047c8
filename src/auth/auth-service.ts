import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { errors as joseErrors, jwtVerify, SignJWT } from 'jose';
import type { Config } from '../config.js';
import type { Principal, Quota } from '../core/principal.js';
import { HutchError } from '../errors.js';
import { type ApiKeyRow, AuthStore, type UserRow } from './auth-store.js';
import type { Accounts, Authenticator } from './authenticator.js';
import { hashApiKey, keyPrefix, looksLikeApiKey, newApiKey, newJti, newKeyId } from './keys.js';
import { RateLimiter } from './rate-limit.js';

export type AuthConfig = Pick<
  Config,
  | 'owner'
  | 'tokenTtlSeconds'
  | 'maxTokenTtlSeconds'
  | 'tokenExchangesPerMinute'
  | 'userMaxVms'
  | 'userMaxMemoryMb'
  | 'userMaxVcpus'
>;

const issuer = 'hutch';
const userName = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const now = (): number => Math.floor(Date.now() / 1000);

/** Where a state dir keeps its accounts. */
export function authDbPath(stateDir: string): string {
  return join(stateDir, 'auth.db');
}

/**
 * Users, API keys and tokens: turns credentials into principals (Authenticator) and serves a
 * user's account operations (Accounts). Tokens are HS256 JWTs signed with a secret made at first
 * use and kept in auth.db; every verification also looks the token's `jti` up, so a revoked
 * token (or one whose key was deleted) stops working at once, on every API.
 */
export class AuthService implements Authenticator, Accounts {
  private readonly secret: Uint8Array;
  private readonly exchanges: RateLimiter;

  constructor(
    readonly store: AuthStore,
    private readonly config: AuthConfig,
  ) {
    this.secret = new Uint8Array(store.secret('jwt-hs256', () => randomBytes(32)));
    this.exchanges = new RateLimiter(config.tokenExchangesPerMinute);
  }

  static open(stateDir: string, config: AuthConfig): AuthService {
    return new AuthService(new AuthStore(authDbPath(stateDir)), config);
  }

  close(): void {
    this.store.close();
  }

  // ---- users (the CLI's bootstrap commands; the daemon's admin) --------------------------------

  /**
   * Adds a user with the default quota unless one is given. The local admin (`ensureAdmin`) is
   * the only user without a quota by default: it is whoever runs the daemon.
   */
  addUser(
    name: string,
    quota: Partial<Pick<UserRow, 'max_vms' | 'max_memory_mb' | 'max_vcpus'>> = {},
  ): UserRow {
    if (!userName.test(name))
      throw new HutchError(
        'INVALID_ARGUMENT',
        `invalid user name ${JSON.stringify(name)}: 1-64 of letters, digits, ".", "_", "-", starting with a letter or digit`,
      );
    const row: UserRow = {
      name,
      created_at: now(),
      max_vms: quota.max_vms === undefined ? this.config.userMaxVms : quota.max_vms,
      max_memory_mb:
        quota.max_memory_mb === undefined ? (this.config.userMaxMemoryMb ?? null) : quota.max_memory_mb,
      max_vcpus: quota.max_vcpus === undefined ? (this.config.userMaxVcpus ?? null) : quota.max_vcpus,
    };
    if (!this.store.addUser(row)) throw new HutchError('USER_EXISTS', `a user named ${name} already exists`);
    return row;
  }

  /** The local admin user exists (no quota beyond the server's caps unless one was set). */
  ensureAdmin(): void {
    if (!this.store.user(this.config.owner))
      this.store.addUser({
        name: this.config.owner,
        created_at: now(),
        max_vms: null,
        max_memory_mb: null,
        max_vcpus: null,
      });
  }

  setQuota(name: string, q: Partial<Pick<UserRow, 'max_vms' | 'max_memory_mb' | 'max_vcpus'>>): UserRow {
    const u = this.userRow(name);
    const next = { max_vms: u.max_vms, max_memory_mb: u.max_memory_mb, max_vcpus: u.max_vcpus, ...q };
    this.store.setQuota(name, next);
    return { ...u, ...next };
  }

  private userRow(name: string): UserRow {
    const u = this.store.user(name);
    if (!u) throw new HutchError('USER_NOT_FOUND', `no user named ${JSON.stringify(name)}`);
    return u;
  }

  // ---- principals ------------------------------------------------------------------------------

  /** The principal of `user`, with its current quota (read per request: changes apply at once). */
  principalFor(
    user: string,
    via: Principal['via'],
    extra: { jti?: string; machine?: string } = {},
  ): Principal {
    return principalOf(user, this.store.user(user), via, extra);
  }

  guestPrincipal(owner: string, machineId: string): Principal {
    return this.principalFor(owner, 'guest', { machine: machineId });
  }

  async verifyBearer(authorization: string | undefined): Promise<Principal> {
    if (authorization === undefined || authorization === '')
      throw new HutchError('UNAUTHENTICATED', 'missing credentials: send "authorization: Bearer <token>"');
    const m = /^Bearer ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$/i.exec(authorization.trim());
    if (!m)
      throw new HutchError(
        'UNAUTHENTICATED',
        'malformed authorization: expected "Bearer <token>" with a JWT from POST /api/v1/auth/token',
      );
    let claims: { sub?: string; jti?: string };
    try {
      ({ payload: claims } = await jwtVerify(m[1] as string, this.secret, {
        issuer,
        algorithms: ['HS256'],
        requiredClaims: ['sub', 'jti', 'exp'],
      }));
    } catch (e) {
      if (e instanceof joseErrors.JWTExpired)
        throw new HutchError('UNAUTHENTICATED', 'the token has expired: exchange your API key for a new one');
      throw new HutchError('UNAUTHENTICATED', 'invalid token: not signed by this server or malformed');
    }
    const t = this.store.token(claims.jti as string);
    if (!t || t.user !== claims.sub)
      throw new HutchError('UNAUTHENTICATED', 'invalid token: unknown to this server');
    if (t.revoked_at !== null) throw new HutchError('UNAUTHENTICATED', 'the token has been revoked');
    if (t.expires_at <= now())
      throw new HutchError('UNAUTHENTICATED', 'the token has expired: exchange your API key for a new one');
    const u = this.store.user(t.user);
    if (!u) throw new HutchError('UNAUTHENTICATED', 'the token’s user no longer exists');
    return principalOf(t.user, u, 'token', { jti: t.jti });
  }

  /**
   * A token of `user` that still works (not revoked, not expired), with its expiry: what a
   * preview grant made from it checks on every request, so it dies with the token.
   */
  liveToken(jti: string, user: string): { expires_at: number } | undefined {
    const t = this.store.token(jti);
    if (!t || t.user !== user || t.revoked_at !== null || t.expires_at <= now()) return undefined;
    return { expires_at: t.expires_at };
  }

  /** The key preview grants are signed with (net/preview/preview-grant.ts), kept in auth.db. */
  previewGrantSecret(): Buffer {
    return this.store.secret('preview-grant', () => randomBytes(32));
  }

  /**
   * POST /api/v1/auth/token: an API key for a JWT. Rate-limited per source address before the
   * key is even looked at, so guessing costs the guesser time, not the daemon.
   */
  async exchange(
    apiKey: unknown,
    source: string,
  ): Promise<{ token: string; expires_at: number; user_id: string }> {
    const wait = this.exchanges.take(source);
    if (wait > 0)
      throw new HutchError('RATE_LIMITED', `too many token requests from ${source}; retry in ${wait} ms`, {
        retry_after_ms: wait,
      });
    if (!looksLikeApiKey(apiKey))
      throw new HutchError('UNAUTHENTICATED', 'invalid API key: expected "bxd_" and 40 letters and digits');
    const key = this.store.keyByHash(hashApiKey(apiKey));
    if (!key) throw new HutchError('UNAUTHENTICATED', 'unknown API key (deleted, or never issued)');
    const t = now();
    if (key.expires_at !== 0 && key.expires_at <= t)
      throw new HutchError('UNAUTHENTICATED', 'the API key has expired');
    this.store.keyUsed(key.id, t);
    const out = await this.issue(key.user, this.config.tokenTtlSeconds, key.id);
    return { token: out.token, expires_at: out.expires_at, user_id: key.user };
  }

  private async issue(
    user: string,
    ttl: number,
    keyId: string | null,
  ): Promise<{ token: string; expires_at: number; jti: string }> {
    const jti = newJti();
    const iat = now();
    const exp = iat + ttl;
    const token = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
      .setIssuer(issuer)
      .setSubject(user)
      .setJti(jti)
      .setIssuedAt(iat)
      .setExpirationTime(exp)
      .sign(this.secret);
    this.store.addToken({ jti, user, key_id: keyId, created_at: iat, expires_at: exp, revoked_at: null });
    if (Math.random() < 0.01) this.store.pruneTokens(iat);
    return { token, expires_at: exp, jti };
  }

  // ---- Accounts: a user's own keys and tokens -------------------------------------------------

  whoami(p: Principal): { user_id: string } {
    return { user_id: p.user };
  }

  async createToken(
    p: Principal,
    expiresInSecs: number,
  ): Promise<{ token: string; expires_at: number; jti: string }> {
    noCredentialsFromGuests(p);
    const ttl = expiresInSecs === 0 ? this.config.tokenTtlSeconds : expiresInSecs;
    if (!Number.isInteger(ttl) || ttl < 1 || ttl > this.config.maxTokenTtlSeconds)
      throw new HutchError(
        'INVALID_ARGUMENT',
        `expires_in_secs must be between 1 and ${this.config.maxTokenTtlSeconds} (0 = ${this.config.tokenTtlSeconds})`,
      );
    this.userRow(p.user);
    return this.issue(p.user, ttl, null);
  }

  listTokens(p: Principal): { jti: string; created_at: number; expires_at: number }[] {
    noCredentialsFromGuests(p);
    return this.store
      .liveTokensOf(p.user, now())
      .map((t) => ({ jti: t.jti, created_at: t.created_at, expires_at: t.expires_at }));
  }

  revokeToken(p: Principal, jti: string): void {
    noCredentialsFromGuests(p);
    if (!this.store.revokeToken(p.user, jti, now()))
      throw new HutchError('TOKEN_NOT_FOUND', `no live token of yours has jti ${JSON.stringify(jti)}`);
  }

  createApiKey(
    p: Principal,
    name: string,
    expiresInSecs: number,
  ): { id: string; api_key: string; expires_at: number } {
    noCredentialsFromGuests(p);
    return this.createApiKeyFor(p.user, name, expiresInSecs);
  }

  /** For `hutch api-key create --user` (no daemon) and CreateApiKey. */
  createApiKeyFor(
    user: string,
    name: string,
    expiresInSecs: number,
  ): { id: string; api_key: string; expires_at: number } {
    this.userRow(user);
    if (name.length > 128 || [...name].some((c) => c < ' '))
      throw new HutchError('INVALID_ARGUMENT', 'an API key name is at most 128 printable characters');
    if (!Number.isInteger(expiresInSecs) || expiresInSecs < 0)
      throw new HutchError(
        'INVALID_ARGUMENT',
        'expires_in_secs must be a whole number of seconds (0 = never)',
      );
    const key = newApiKey();
    const t = now();
    const row: ApiKeyRow = {
      id: newKeyId(),
      user,
      name,
      prefix: keyPrefix(key),
      hash: hashApiKey(key),
      created_at: t,
      expires_at: expiresInSecs === 0 ? 0 : t + expiresInSecs,
      last_used_at: 0,
    };
    this.store.addKey(row);
    return { id: row.id, api_key: key, expires_at: row.expires_at };
  }

  listApiKeys(p: Principal): {
    id: string;
    name: string;
    key_prefix: string;
    created_at: number;
    last_used_at: number;
    expires_at: number;
  }[] {
    noCredentialsFromGuests(p);
    return this.store.keysOf(p.user).map((k) => ({
      id: k.id,
      name: k.name,
      key_prefix: k.prefix,
      created_at: k.created_at,
      last_used_at: k.last_used_at,
      expires_at: k.expires_at,
    }));
  }

  deleteApiKey(p: Principal, id: string): void {
    noCredentialsFromGuests(p);
    if (!this.store.deleteKey(p.user, id, now()))
      throw new HutchError('API_KEY_NOT_FOUND', `no API key of yours has id ${JSON.stringify(id)}`);
  }
}

/**
 * A machine acts as its owner only from inside itself: a credential minted there (or a key or
 * token of the owner's revoked or listed from there) would let that identity leave the guest.
 */
function noCredentialsFromGuests(p: Principal): void {
  if (p.via === 'guest')
    throw new HutchError(
      'PERMISSION_DENIED',
      'API keys and tokens cannot be made or managed from inside a machine; use the host CLI or another client',
    );
}

/** A principal of `user` (its row, when it has one) with the row's quota. */
function principalOf(
  user: string,
  row: UserRow | undefined,
  via: Principal['via'],
  extra: { jti?: string; machine?: string },
): Principal {
  const quota = row ? quotaOf(row) : undefined;
  return { user, via, ...extra, ...(quota ? { quota } : {}) };
}

function quotaOf(u: UserRow): Quota | undefined {
  const q: { maxActive?: number; maxMemoryMb?: number; maxVcpus?: number } = {};
  if (u.max_vms !== null) q.maxActive = u.max_vms;
  if (u.max_memory_mb !== null) q.maxMemoryMb = u.max_memory_mb;
  if (u.max_vcpus !== null) q.maxVcpus = u.max_vcpus;
  return Object.keys(q).length ? q : undefined;
}
