import { chmodSync, closeSync, existsSync, mkdirSync, openSync } from 'node:fs';
import { dirname } from 'node:path';
import Database from 'better-sqlite3';

/**
 * A SQLite file of the daemon's own (auth.db, net.db): owner-only from the first byte (it holds
 * key hashes, signing secrets, users' rules), WAL with synchronous=FULL (an acknowledged change
 * is on disk), a busy timeout (the daemon and an offline CLI command may write at once), foreign
 * keys on, and its migrations applied in one transaction.
 */
export function openOwnerOnlyDb(path: string, migrations: readonly string[]): Database.Database {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  closeSync(openSync(path, 'a', 0o600));
  for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
  const db = new Database(path);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.pragma('busy_timeout = 5000');
  db.pragma('foreign_keys = ON');
  db.exec('CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)');
  db.transaction(() => {
    const row = db.prepare('SELECT version FROM schema_version').get() as { version: number } | undefined;
    const from = row?.version ?? 0;
    for (let v = from; v < migrations.length; v++) db.exec(migrations[v] as string);
    if (!row) db.prepare('INSERT INTO schema_version VALUES (?)').run(migrations.length);
    else db.prepare('UPDATE schema_version SET version = ?').run(migrations.length);
  })();
  return db;
}
