import type Database from 'better-sqlite3';
import { openOwnerOnlyDb } from '../sqlite-file.js';
import type { UpstreamName } from './upstream.js';

/** One gateway request, as recorded once it has ended (answered, failed or abandoned). */
export interface UsageRow {
  user: string;
  model: string;
  upstream: UpstreamName;
  prompt_tokens: number;
  completion_tokens: number;
  /** The HTTP status the client got (499: it went away first). */
  status: number;
  ms: number;
  /** `api`: a client of /v1/chat/completions; `agent`: hutch's own agents (anthropicMessages). */
  source: 'api' | 'agent';
  at: number;
}

export interface UsageTotal {
  model: string;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

const migrations = [
  `CREATE TABLE usage (
     id INTEGER PRIMARY KEY,
     user TEXT NOT NULL,
     model TEXT NOT NULL,
     upstream TEXT NOT NULL,
     prompt_tokens INTEGER NOT NULL,
     completion_tokens INTEGER NOT NULL,
     status INTEGER NOT NULL,
     ms INTEGER NOT NULL,
     source TEXT NOT NULL,
     at INTEGER NOT NULL
   );
   CREATE INDEX usage_user_at ON usage(user, at);`,
];

/** gateway.db: per-user token usage, one row per request (what billing and quotas will read). */
export class UsageStore {
  private readonly db: Database.Database;
  private readonly insertStmt: Database.Statement;

  constructor(path: string) {
    this.db = openOwnerOnlyDb(path, migrations);
    // A row per request, written on the daemon's only thread: with synchronous=FULL each one
    // waited for an fsync, on every caller's time. WAL with NORMAL never corrupts the file and
    // loses at most the last rows on a power cut, which usage accounting can afford.
    this.db.pragma('synchronous = NORMAL');
    this.insertStmt = this.db.prepare(
      'INSERT INTO usage (user, model, upstream, prompt_tokens, completion_tokens, status, ms, source, at) VALUES (@user, @model, @upstream, @prompt_tokens, @completion_tokens, @status, @ms, @source, @at)',
    );
  }

  record(row: UsageRow): void {
    this.insertStmt.run(row);
  }

  /** One user's totals per model since `since` (ms since the epoch). */
  totals(user: string, since: number): UsageTotal[] {
    return (
      this.db
        .prepare(
          'SELECT model, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens FROM usage WHERE user = ? AND at >= ? GROUP BY model ORDER BY model',
        )
        .all(user, since) as Omit<UsageTotal, 'total_tokens'>[]
    ).map((r) => ({ ...r, total_tokens: r.prompt_tokens + r.completion_tokens }));
  }

  close(): void {
    this.db.close();
  }
}
