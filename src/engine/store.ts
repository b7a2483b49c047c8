import { chmodSync, closeSync, existsSync, openSync } from 'node:fs';
import Database from 'better-sqlite3';
import { HutchError, isDiskFull } from '../errors.js';

export type MachineState =
  | 'starting'
  | 'running'
  | 'paused'
  | 'suspending'
  | 'suspended'
  | 'resuming'
  | 'failed'
  | 'destroying'
  /** A box being shut down (its guest syncs and powers off). */
  | 'stopping'
  /** A box whose VM is off; its disk is kept and `start` boots it again. */
  | 'stopped';

/** States in which a machine holds host memory (and so counts against the caps). */
export const activeStates: readonly MachineState[] = [
  'starting',
  'running',
  'paused',
  'suspending',
  'resuming',
  'stopping',
];

export interface MachineRow {
  id: string;
  owner: string;
  name: string | null;
  template: string;
  template_hash: string;
  state: MachineState;
  mode: 'cold' | 'snapshot' | 'branch' | 'pool';
  accel: string;
  vcpus: number;
  memory_mb: number;
  persistent: number;
  ttl_seconds: number | null;
  created_at: string;
  expires_at: string | null;
  boot_ms: number | null;
  pid: number | null;
  run_dir: string;
  error: string | null;
  jail: string | null;
  /** Idle seconds before auto-suspend; null = the server's default, 0 = never. */
  auto_suspend_seconds: number | null;
  /** The machine this one was branched from. */
  parent_id: string | null;
  /** `machine` (REST /v1/machines, from a template) or `box` (REST /v1/boxes, from an image). */
  kind: 'machine' | 'box';
  /** A box's settings as JSON (BoxSpec); null for machines. */
  spec: string | null;
  started_at: string | null;
  stopped_at: string | null;
  /** 1: the machine has a NIC, behind its own namespace and firewall (src/net/). */
  net: number;
  /** Its screen, `WIDTHxHEIGHT`, when it has a display (desktop machines); null: headless. */
  display: string | null;
}

/** An exec started through the boxes API; its output lives in an event log beside the box. */
export interface ExecRow {
  id: string;
  box_id: string;
  cmd: string;
  status: 'running' | 'completed' | 'failed' | 'timed_out' | 'cancelled';
  exit_code: number | null;
  signal: number | null;
  error: string | null;
  created_at: string;
  finished_at: string | null;
}

/** A user's template (gRPC CreateTemplate): an image and a size whose box snapshot is kept ready. */
export interface TemplateRow {
  id: string;
  owner: string;
  name: string;
  image: string;
  status: 'building' | 'ready' | 'failed';
  cpu: number;
  memory_mb: number;
  disk_size_gb: number;
  /** The image as resolved when the template was made (BootImage JSON): boxes boot exactly it. */
  manifest: string | null;
  error: string | null;
  created_at: string;
}

const migrations: string[] = [
  `CREATE TABLE machines (
     id TEXT PRIMARY KEY,
     owner TEXT NOT NULL,
     name TEXT,
     template TEXT NOT NULL,
     template_hash TEXT NOT NULL,
     state TEXT NOT NULL,
     mode TEXT NOT NULL,
     accel TEXT NOT NULL,
     vcpus INTEGER NOT NULL,
     memory_mb INTEGER NOT NULL,
     persistent INTEGER NOT NULL,
     ttl_seconds INTEGER,
     created_at TEXT NOT NULL,
     expires_at TEXT,
     boot_ms INTEGER,
     pid INTEGER,
     run_dir TEXT NOT NULL,
     error TEXT,
     jail TEXT
   );
   CREATE UNIQUE INDEX machines_owner_name ON machines(owner, name) WHERE name IS NOT NULL;`,
  'ALTER TABLE machines ADD COLUMN auto_suspend_seconds INTEGER',
  'ALTER TABLE machines ADD COLUMN parent_id TEXT',
  `ALTER TABLE machines ADD COLUMN kind TEXT NOT NULL DEFAULT 'machine';
   ALTER TABLE machines ADD COLUMN spec TEXT;
   ALTER TABLE machines ADD COLUMN started_at TEXT;
   ALTER TABLE machines ADD COLUMN stopped_at TEXT;
   CREATE TABLE execs (
     id TEXT PRIMARY KEY,
     box_id TEXT NOT NULL,
     cmd TEXT NOT NULL,
     status TEXT NOT NULL,
     exit_code INTEGER,
     signal INTEGER,
     error TEXT,
     created_at TEXT NOT NULL,
     finished_at TEXT
   );
   CREATE INDEX execs_box ON execs(box_id, created_at);`,
  `CREATE TABLE templates (
     id TEXT PRIMARY KEY,
     owner TEXT NOT NULL,
     name TEXT NOT NULL,
     image TEXT NOT NULL,
     status TEXT NOT NULL,
     cpu INTEGER NOT NULL,
     memory_mb INTEGER NOT NULL,
     disk_size_gb INTEGER NOT NULL,
     manifest TEXT,
     error TEXT,
     created_at TEXT NOT NULL
   );
   CREATE UNIQUE INDEX templates_owner_name ON templates(owner, name);`,
  'ALTER TABLE machines ADD COLUMN net INTEGER NOT NULL DEFAULT 0',
  'ALTER TABLE machines ADD COLUMN display TEXT',
];

/**
 * The daemon's state in one SQLite file. WAL with synchronous=FULL: once the API has answered,
 * the change is on disk, whatever happens to the daemon next.
 */
export class Store {
  private readonly db: Database.Database;

  constructor(path: string) {
    // Box specs and their env live here: owner-only from the first byte (SQLite gives its -wal
    // and -shm files the database file's mode).
    closeSync(openSync(path, 'a', 0o600));
    for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
    this.db = new Database(path);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = FULL');
    this.db.pragma('busy_timeout = 5000');
    this.migrate();
  }

  private migrate(): void {
    this.db.exec('CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)');
    const row = this.db.prepare('SELECT version FROM schema_version').get() as
      | { version: number }
      | undefined;
    let version = row?.version ?? 0;
    if (!row) this.db.prepare('INSERT INTO schema_version (version) VALUES (0)').run();
    for (; version < migrations.length; version++) {
      const sql = migrations[version] ?? '';
      this.db.transaction(() => {
        this.db.exec(sql);
        this.db.prepare('UPDATE schema_version SET version = ?').run(version + 1);
      })();
    }
  }

  /**
   * Inserts a machine if `admit` accepts the machines that currently hold resources. Check and
   * insert run in one transaction, so concurrent creates cannot both squeeze under a cap.
   */
  insertMachine(row: MachineRow, admit: (active: MachineRow[]) => void): void {
    this.write(() => {
      this.db.transaction(() => {
        admit(this.activeRows());
        this.db
          .prepare(
            `INSERT INTO machines (id, owner, name, template, template_hash, state, mode, accel, vcpus, memory_mb,
             persistent, ttl_seconds, created_at, expires_at, boot_ms, pid, run_dir, error, jail, auto_suspend_seconds,
             parent_id, kind, spec, started_at, stopped_at, net, display)
           VALUES (@id, @owner, @name, @template, @template_hash, @state, @mode, @accel, @vcpus, @memory_mb,
             @persistent, @ttl_seconds, @created_at, @expires_at, @boot_ms, @pid, @run_dir, @error, @jail,
             @auto_suspend_seconds, @parent_id, @kind, @spec, @started_at, @stopped_at, @net, @display)`,
          )
          .run(row);
      })();
    });
  }

  /** The machines holding host resources now (what the caps count). */
  activeRows(): MachineRow[] {
    return this.db
      .prepare(`SELECT * FROM machines WHERE state IN (${activeStates.map((x) => `'${x}'`).join(', ')})`)
      .all() as MachineRow[];
  }

  /** Updates a machine if `admit` accepts the machines holding resources now (a box starting again). */
  admitUpdate(
    id: string,
    fields: Partial<Omit<MachineRow, 'id'>>,
    admit: (active: MachineRow[]) => void,
  ): void {
    this.write(() => {
      this.db.transaction(() => {
        admit(this.activeRows());
        this.update(id, fields);
      })();
    });
  }

  update(id: string, fields: Partial<Omit<MachineRow, 'id'>>): void {
    this.write(() => {
      const keys = Object.keys(fields);
      if (keys.length === 0) return;
      const set = keys.map((k) => `${k} = @${k}`).join(', ');
      this.db.prepare(`UPDATE machines SET ${set} WHERE id = @id`).run({ ...fields, id });
    });
  }

  get(id: string): MachineRow | undefined {
    return this.db.prepare('SELECT * FROM machines WHERE id = ?').get(id) as MachineRow | undefined;
  }

  findByName(owner: string, name: string): MachineRow | undefined {
    return this.db.prepare('SELECT * FROM machines WHERE owner = ? AND name = ?').get(owner, name) as
      | MachineRow
      | undefined;
  }

  list(owner?: string): MachineRow[] {
    return (
      owner === undefined
        ? this.db.prepare('SELECT * FROM machines ORDER BY created_at, id').all()
        : this.db.prepare('SELECT * FROM machines WHERE owner = ? ORDER BY created_at, id').all(owner)
    ) as MachineRow[];
  }

  delete(id: string): void {
    this.write(() => {
      this.db.transaction(() => {
        this.db.prepare('DELETE FROM execs WHERE box_id = ?').run(id);
        this.db.prepare('DELETE FROM machines WHERE id = ?').run(id);
      })();
    });
  }

  insertExec(row: ExecRow): void {
    this.write(() => {
      this.db
        .prepare(
          `INSERT INTO execs (id, box_id, cmd, status, exit_code, signal, error, created_at, finished_at)
         VALUES (@id, @box_id, @cmd, @status, @exit_code, @signal, @error, @created_at, @finished_at)`,
        )
        .run(row);
    });
  }

  updateExec(id: string, fields: Partial<Omit<ExecRow, 'id' | 'box_id'>>): void {
    this.write(() => {
      const keys = Object.keys(fields);
      if (keys.length === 0) return;
      const set = keys.map((k) => `${k} = @${k}`).join(', ');
      this.db.prepare(`UPDATE execs SET ${set} WHERE id = @id`).run({ ...fields, id });
    });
  }

  deleteExec(id: string): void {
    this.write(() => {
      this.db.prepare('DELETE FROM execs WHERE id = ?').run(id);
    });
  }

  getExec(id: string): ExecRow | undefined {
    return this.db.prepare('SELECT * FROM execs WHERE id = ?').get(id) as ExecRow | undefined;
  }

  listExecs(boxId: string): ExecRow[] {
    return this.db
      .prepare('SELECT * FROM execs WHERE box_id = ? ORDER BY created_at, id')
      .all(boxId) as ExecRow[];
  }

  /** Execs left running by a daemon that died: their streams died with its connection. */
  runningExecs(): ExecRow[] {
    return this.db.prepare("SELECT * FROM execs WHERE status = 'running'").all() as ExecRow[];
  }

  /** Inserts a template; a name the owner already uses is NAME_TAKEN (checked by the index). */
  insertTemplate(row: TemplateRow): void {
    this.write(() => {
      try {
        this.db
          .prepare(
            `INSERT INTO templates (id, owner, name, image, status, cpu, memory_mb, disk_size_gb, manifest, error, created_at)
           VALUES (@id, @owner, @name, @image, @status, @cpu, @memory_mb, @disk_size_gb, @manifest, @error, @created_at)`,
          )
          .run(row);
      } catch (e) {
        if (String((e as { code?: unknown }).code) === 'SQLITE_CONSTRAINT_UNIQUE')
          throw new HutchError('NAME_TAKEN', `a template named ${JSON.stringify(row.name)} already exists`);
        throw e;
      }
    });
  }

  updateTemplate(id: string, fields: Partial<Omit<TemplateRow, 'id' | 'owner'>>): void {
    this.write(() => {
      const keys = Object.keys(fields);
      if (keys.length === 0) return;
      const set = keys.map((k) => `${k} = @${k}`).join(', ');
      this.db.prepare(`UPDATE templates SET ${set} WHERE id = @id`).run({ ...fields, id });
    });
  }

  /** The owner's template by id or name. */
  findTemplate(owner: string, idOrName: string): TemplateRow | undefined {
    return this.db
      .prepare('SELECT * FROM templates WHERE owner = ? AND (id = ? OR name = ?) ORDER BY id = ? DESC')
      .get(owner, idOrName, idOrName, idOrName) as TemplateRow | undefined;
  }

  /** Every template of `owner`, or of everyone. */
  listTemplates(owner?: string): TemplateRow[] {
    return (
      owner === undefined
        ? this.db.prepare('SELECT * FROM templates ORDER BY created_at, id').all()
        : this.db.prepare('SELECT * FROM templates WHERE owner = ? ORDER BY created_at, id').all(owner)
    ) as TemplateRow[];
  }

  deleteTemplate(id: string): void {
    this.write(() => {
      this.db.prepare('DELETE FROM templates WHERE id = ?').run(id);
    });
  }

  close(): void {
    this.db.close();
  }

  /**
   * Every write goes through here: a full disk (or an I/O error) becomes STORAGE_FULL, a clear
   * 507 for the operation that needed the space, with the transaction rolled back; reads and
   * everything else keep working.
   */
  private write(fn: () => void): void {
    try {
      fn();
    } catch (e) {
      if (e instanceof HutchError) throw e;
      const code = String((e as { code?: unknown }).code);
      if (isDiskFull(e) || /^(SQLITE_IOERR|SQLITE_CANTOPEN)/.test(code))
        throw new HutchError('STORAGE_FULL', `the state database cannot be written: ${(e as Error).message}`);
      throw e;
    }
  }
}
