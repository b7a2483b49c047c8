import type Database from 'better-sqlite3';
import { openOwnerOnlyDb } from '../../sqlite-file.js';

/** An attachable disk: a sparse ext4 image on this host (`<state dir>/disks/<id>.img`). */
export interface DiskRow {
  id: string;
  owner: string;
  name: string;
  size_bytes: number;
  path: string;
  /** `raw`: made by CreateDisk; `qcow2`: a branch's copy, written by QEMU (zeros stay unallocated). */
  format: 'raw' | 'qcow2';
  created_at: number;
  /**
   * A branch's copy of its source's read-write disk: removed with that clone while still attached
   * to it (a thrown-away fork leaves nothing behind); detaching it makes it an ordinary disk.
   */
  clone_of: string | null;
}

/** A disk mounted in a machine (or box) at `mount_path`, on SCSI target `target` of its disk bus. */
export interface AttachmentRow {
  disk_id: string;
  machine_id: string;
  mount_path: string;
  read_only: 0 | 1;
  target: number;
  created_at: number;
}

const migrations = [
  `CREATE TABLE disks (
     id TEXT PRIMARY KEY,
     owner TEXT NOT NULL,
     name TEXT NOT NULL,
     size_bytes INTEGER NOT NULL,
     path TEXT NOT NULL,
     format TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     clone_of TEXT,
     UNIQUE (owner, name)
   );
   CREATE TABLE attachments (
     disk_id TEXT NOT NULL REFERENCES disks(id),
     machine_id TEXT NOT NULL,
     mount_path TEXT NOT NULL,
     read_only INTEGER NOT NULL,
     target INTEGER NOT NULL,
     created_at INTEGER NOT NULL,
     PRIMARY KEY (disk_id, machine_id),
     UNIQUE (machine_id, target),
     UNIQUE (machine_id, mount_path)
   );
   CREATE INDEX attachments_machine ON attachments(machine_id);`,
];

/**
 * disks.db: the disks and where they are attached. An attachment row exists from the moment the
 * disk is mounted in the guest (or, for a clone, launched with it) until it is unmounted or its
 * machine is removed, so a restarted daemon, a resume and a cold start know what to plug in.
 */
export class DiskStore {
  readonly db: Database.Database;

  constructor(path: string) {
    this.db = openOwnerOnlyDb(path, migrations);
  }

  insert(row: DiskRow): void {
    this.db
      .prepare(
        'INSERT INTO disks (id, owner, name, size_bytes, path, format, created_at, clone_of) VALUES (@id, @owner, @name, @size_bytes, @path, @format, @created_at, @clone_of)',
      )
      .run(row);
  }

  get(id: string): DiskRow | undefined {
    return this.db.prepare('SELECT * FROM disks WHERE id = ?').get(id) as DiskRow | undefined;
  }

  byName(owner: string, name: string): DiskRow | undefined {
    return this.db.prepare('SELECT * FROM disks WHERE owner = ? AND name = ?').get(owner, name) as
      | DiskRow
      | undefined;
  }

  list(owner: string): DiskRow[] {
    return this.db
      .prepare('SELECT * FROM disks WHERE owner = ? ORDER BY created_at, id')
      .all(owner) as DiskRow[];
  }

  all(): DiskRow[] {
    return this.db.prepare('SELECT * FROM disks').all() as DiskRow[];
  }

  /** The bytes of disk the user has asked for (sparse: what they may fill, not what they use). */
  committedBytes(owner: string): number {
    const r = this.db
      .prepare('SELECT COALESCE(SUM(size_bytes), 0) AS n FROM disks WHERE owner = ?')
      .get(owner) as {
      n: number;
    };
    return r.n;
  }

  delete(id: string): void {
    this.db.prepare('DELETE FROM disks WHERE id = ?').run(id);
  }

  attach(row: AttachmentRow): void {
    this.db
      .prepare(
        'INSERT INTO attachments (disk_id, machine_id, mount_path, read_only, target, created_at) VALUES (@disk_id, @machine_id, @mount_path, @read_only, @target, @created_at)',
      )
      .run(row);
  }

  detach(diskId: string, machineId: string): void {
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM attachments WHERE disk_id = ? AND machine_id = ?').run(diskId, machineId);
      this.db.prepare('UPDATE disks SET clone_of = NULL WHERE id = ?').run(diskId);
    })();
  }

  attachmentsOfDisk(diskId: string): AttachmentRow[] {
    return this.db
      .prepare('SELECT * FROM attachments WHERE disk_id = ? ORDER BY created_at')
      .all(diskId) as AttachmentRow[];
  }

  attachmentsOf(machineId: string): AttachmentRow[] {
    return this.db
      .prepare('SELECT * FROM attachments WHERE machine_id = ? ORDER BY target')
      .all(machineId) as AttachmentRow[];
  }

  /**
   * A removed machine's attachments (its disks stay, free to attach elsewhere), and the disks
   * made for it as a branch's copies, which go with it: their paths, for the caller to delete.
   */
  forgetMachine(machineId: string): string[] {
    return this.db.transaction(() => {
      this.db.prepare('DELETE FROM attachments WHERE machine_id = ?').run(machineId);
      const copies = this.db
        .prepare('SELECT * FROM disks WHERE clone_of = ? AND id NOT IN (SELECT disk_id FROM attachments)')
        .all(machineId) as DiskRow[];
      for (const d of copies) this.db.prepare('DELETE FROM disks WHERE id = ?').run(d.id);
      return copies.map((d) => d.path);
    })();
  }

  /** Attachments whose machine no longer exists (a crash between a removal and this cleanup). */
  forgetAllBut(machineIds: ReadonlySet<string>): number {
    let n = 0;
    for (const a of this.db.prepare('SELECT DISTINCT machine_id FROM attachments').all() as {
      machine_id: string;
    }[])
      if (!machineIds.has(a.machine_id)) {
        this.forgetMachine(a.machine_id);
        n++;
      }
    return n;
  }

  close(): void {
    this.db.close();
  }
}
