import type Database from 'better-sqlite3';
import { openOwnerOnlyDb } from '../sqlite-file.js';

/** A user: the owner of machines, boxes, templates, keys and tokens. */
export interface UserRow {
  name: string;
  created_at: number;
  /** Running machines, boxes and VMs at once; null: only the server's caps. */
  max_vms: number | null;
  max_memory_mb: number | null;
  max_vcpus: number | null;
}

export interface ApiKeyRow {
  id: string;
  user: string;
  name: string;
  /** The first characters of the key, kept for listing (`bxd_` + 6). */
  prefix: string;
  /** sha256 of the whole key, hex. */
  hash: string;
  created_at: number;
  /** Unix seconds; 0 = never. */
  expires_at: number;
  last_used_at: number;
}

export interface TokenRow {
  jti: string;
  user: string;
  /** The key it was exchanged for; null for tokens made by CreateToken with a token. */
  key_id: string | null;
  created_at: number;
  expires_at: number;
  revoked_at: number | null;
}

const migrations = [
  `CREATE TABLE users (
     name TEXT PRIMARY KEY,
     created_at INTEGER NOT NULL,
     max_vms INTEGER,
     max_memory_mb INTEGER,
     max_vcpus INTEGER
   );
   CREATE TABLE api_keys (
     id TEXT PRIMARY KEY,
     user TEXT NOT NULL REFERENCES users(name),
     name TEXT NOT NULL,
     prefix TEXT NOT NULL,
     hash TEXT NOT NULL UNIQUE,
     created_at INTEGER NOT NULL,
     expires_at INTEGER NOT NULL,
     last_used_at INTEGER NOT NULL
   );
   CREATE TABLE tokens (
     jti TEXT PRIMARY KEY,
     user TEXT NOT NULL REFERENCES users(name),
     key_id TEXT,
     created_at INTEGER NOT NULL,
     expires_at INTEGER NOT NULL,
     revoked_at INTEGER
   );
   CREATE INDEX tokens_user ON tokens(user, created_at);
   CREATE TABLE secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);`,
];

/**
 * Accounts in their own SQLite file (`<state dir>/auth.db`, owner-only): the CLI's bootstrap
 * commands (`hutch user add`, `hutch api-key create`) open it without a daemon, and it shares no
 * transaction with the machines' store (quotas travel in the principal to the insert's).
 * WAL + busy timeout: the daemon and a CLI command may write at the same moment.
 */
export class AuthStore {
  private readonly db: Database.Database;

  constructor(path: string) {
    this.db = openOwnerOnlyDb(path, migrations);
  }

  /** The value of a secret, made by `make` (and kept) the first time it is asked for. */
  secret(name: string, make: () => Buffer): Buffer {
    return this.db.transaction(() => {
      const row = this.db.prepare('SELECT value FROM secrets WHERE name = ?').get(name) as
        | { value: Buffer }
        | undefined;
      if (row) return row.value;
      const value = make();
      this.db.prepare('INSERT INTO secrets VALUES (?, ?)').run(name, value);
      return value;
    })();
  }

  user(name: string): UserRow | undefined {
    return this.db.prepare('SELECT * FROM users WHERE name = ?').get(name) as UserRow | undefined;
  }

  users(): UserRow[] {
    return this.db.prepare('SELECT * FROM users ORDER BY name').all() as UserRow[];
  }

  /** Inserts a user; false when one of that name exists. */
  addUser(row: UserRow): boolean {
    const r = this.db
      .prepare(
        'INSERT OR IGNORE INTO users VALUES (@name, @created_at, @max_vms, @max_memory_mb, @max_vcpus)',
      )
      .run(row);
    return r.changes === 1;
  }

  setQuota(name: string, q: Pick<UserRow, 'max_vms' | 'max_memory_mb' | 'max_vcpus'>): boolean {
    const r = this.db
      .prepare(
        'UPDATE users SET max_vms = @max_vms, max_memory_mb = @max_memory_mb, max_vcpus = @max_vcpus WHERE name = @name',
      )
      .run({ name, ...q });
    return r.changes === 1;
  }

  addKey(row: ApiKeyRow): void {
    this.db
      .prepare(
        `INSERT INTO api_keys VALUES (@id, @user, @name, @prefix, @hash, @created_at, @expires_at, @last_used_at)`,
      )
      .run(row);
  }

  keyByHash(hash: string): ApiKeyRow | undefined {
    return this.db.prepare('SELECT * FROM api_keys WHERE hash = ?').get(hash) as ApiKeyRow | undefined;
  }

  keysOf(user: string): ApiKeyRow[] {
    return this.db
      .prepare('SELECT * FROM api_keys WHERE user = ? ORDER BY created_at, rowid')
      .all(user) as ApiKeyRow[];
  }

  keyUsed(id: string, at: number): void {
    this.db.prepare('UPDATE api_keys SET last_used_at = ? WHERE id = ?').run(at, id);
  }

  /**
   * Deletes a user's key and revokes every token it was exchanged for, in one transaction: a key
   * is deleted because it leaked, and tokens minted from a leaked key are leaked too.
   */
  deleteKey(user: string, id: string, at: number): boolean {
    return this.db.transaction(() => {
      const r = this.db.prepare('DELETE FROM api_keys WHERE id = ? AND user = ?').run(id, user);
      if (r.changes === 0) return false;
      this.db.prepare('UPDATE tokens SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL').run(at, id);
      return true;
    })();
  }

  addToken(row: TokenRow): void {
    this.db
      .prepare('INSERT INTO tokens VALUES (@jti, @user, @key_id, @created_at, @expires_at, @revoked_at)')
      .run(row);
  }

  token(jti: string): TokenRow | undefined {
    return this.db.prepare('SELECT * FROM tokens WHERE jti = ?').get(jti) as TokenRow | undefined;
  }

  /** A user's tokens that still work (not expired, not revoked). */
  liveTokensOf(user: string, now: number): TokenRow[] {
    return this.db
      .prepare(
        'SELECT * FROM tokens WHERE user = ? AND revoked_at IS NULL AND expires_at > ? ORDER BY created_at, rowid',
      )
      .all(user, now) as TokenRow[];
  }

  revokeToken(user: string, jti: string, at: number): boolean {
    const r = this.db
      .prepare('UPDATE tokens SET revoked_at = ? WHERE jti = ? AND user = ? AND revoked_at IS NULL')
      .run(at, jti, user);
    return r.changes === 1;
  }

  /** Drops token rows expired for a day: a revocation list only matters while a token is valid. */
  pruneTokens(now: number): number {
    return this.db.prepare('DELETE FROM tokens WHERE expires_at < ?').run(now - 86400).changes;
  }

  close(): void {
    this.db.close();
  }
}
