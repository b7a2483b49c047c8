import { randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { backingFile } from '../vmm/disk.js';
import type { BuildKeys } from './builder.js';
import { contentHash } from './staging.js';

/**
 * Who holds what in an image cache shared by several daemons (each with its own state dir).
 *
 * Every daemon registers itself in <imageDir>/holders/<hash of its state dir>.json with its pid
 * and the cache keys of its build. A garbage collector then keeps, besides its own:
 *   - what every registered state dir's store and run dir reference (read, never written);
 *   - the current artifacts of every registered daemon that is running (another build of hutch
 *     resolves other keys, and will create machines from them at any moment);
 *   - whatever any process has open or mapped (/proc/<pid>/fd and maps).
 * Artifacts in use also have their directory's mtime bumped (markUsed), so one just resolved
 * is younger than the collector's minimum age.
 */

/** Bumps a cache entry's mtime: it was just used. False when the entry is gone. */
export function markUsed(dir: string): boolean {
  const now = new Date();
  try {
    utimesSync(dir, now, now);
    return true;
  } catch {
    // A read-only cache cannot be marked, and cannot be collected either.
    return existsSync(dir);
  }
}

export interface HolderRecord {
  state_dir: string;
  /** The daemon's pid when it registered; null for a registration by the CLI. */
  pid: number | null;
  /** The cache keys of its build; null when unknown (registered by the CLI). */
  keys: BuildKeys | null;
  updated_at: string;
}

const holdersDir = (imageDir: string): string => join(imageDir, 'holders');
const recordPath = (imageDir: string, stateDir: string): string =>
  join(holdersDir(imageDir), `${contentHash(stateDir)}.json`);

/**
 * Records that the daemon of `stateDir` uses this image cache. Without a pid (the CLI) an
 * existing record is left as it is: a daemon's own registration says more.
 */
export function registerHolder(
  imageDir: string,
  stateDir: string,
  pid: number | null,
  keys: BuildKeys | null,
): void {
  const path = recordPath(imageDir, stateDir);
  if (pid === null && existsSync(path)) return;
  mkdirSync(holdersDir(imageDir), { recursive: true, mode: 0o755 });
  const record: HolderRecord = { state_dir: stateDir, pid, keys, updated_at: new Date().toISOString() };
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  writeFileSync(tmp, `${JSON.stringify(record, null, 2)}\n`);
  renameSync(tmp, path);
}

export function readHolders(imageDir: string): HolderRecord[] {
  const dir = holdersDir(imageDir);
  if (!existsSync(dir)) return [];
  const out: HolderRecord[] = [];
  for (const f of readdirSync(dir)) {
    if (!f.endsWith('.json')) continue;
    try {
      const r = JSON.parse(readFileSync(join(dir, f), 'utf8')) as HolderRecord;
      if (typeof r.state_dir === 'string') out.push(r);
    } catch {
      // written by rename, so never half a file; anything else is not ours
    }
  }
  return out;
}

/** Drops the registration of a state dir that no longer exists (nothing there holds anything). */
export function forgetHolder(imageDir: string, stateDir: string): void {
  rmSync(recordPath(imageDir, stateDir), { force: true });
}

/** What one daemon's state dir references in the image cache, and what its store knows of. */
export interface StateDirHolds {
  /** Absolute paths of files (or directories) the state dir's machines and boxes depend on. */
  paths: Set<string>;
  machineIds: Set<string>;
  execIds: Set<string>;
  /** Entries of <stateDir>/run. */
  runDirs: string[];
}

interface HoldingRow {
  id: string;
  kind: string;
  template: string;
  template_hash: string;
  spec: string | null;
  run_dir: string;
}

/**
 * Reads (never writes) a state dir: its store's machine and box rows (a machine's template, a
 * box's image disk and kernel) and every qcow2 in its run dir with its whole backing chain (a
 * clone's overlay → the snapshot's disk → the template's or image's root filesystem). Pooled
 * machines have a run dir but no row: the scan of run/ finds their disks.
 */
export function readStateDirHolds(stateDir: string, imageDir: string): StateDirHolds {
  const holds: StateDirHolds = { paths: new Set(), machineIds: new Set(), execIds: new Set(), runDirs: [] };
  const runDirs = new Set<string>();
  const runRoot = join(stateDir, 'run');
  if (existsSync(runRoot)) for (const d of readdirSync(runRoot)) runDirs.add(join(runRoot, d));
  const dbPath = join(stateDir, 'hutch.db');
  if (existsSync(dbPath)) {
    const db = new Database(dbPath, { readonly: true, fileMustExist: true });
    try {
      db.pragma('busy_timeout = 5000');
      const rows = db
        .prepare('SELECT id, kind, template, template_hash, spec, run_dir FROM machines')
        .all() as HoldingRow[];
      for (const row of rows) {
        holds.machineIds.add(row.id);
        runDirs.add(row.run_dir);
        if (row.kind === 'machine') {
          holds.paths.add(join(imageDir, 'templates', `${row.template}-${row.template_hash}`));
        } else if (row.spec) {
          const m = (JSON.parse(row.spec) as { manifest?: { kernel?: unknown; rootfs?: unknown } }).manifest;
          for (const p of [m?.kernel, m?.rootfs]) if (typeof p === 'string') holds.paths.add(p);
        }
      }
      for (const x of db.prepare('SELECT id FROM execs').all() as { id: string }[]) holds.execIds.add(x.id);
    } finally {
      db.close();
    }
  }
  for (const dir of runDirs) {
    let entries: string[];
    try {
      entries = readdirSync(dir);
    } catch {
      continue;
    }
    for (const f of entries)
      if (f.endsWith('.qcow2')) for (const p of backingChain(join(dir, f))) holds.paths.add(p);
  }
  holds.runDirs = [...runDirs].filter((d) => d.startsWith(`${runRoot}/`) && existsSync(d));
  return holds;
}

/** The files below a qcow2 overlay, nearest first (the overlay itself excluded). */
export function backingChain(image: string): string[] {
  const chain: string[] = [];
  let cur = image;
  // QEMU refuses chains deeper than this; a loop is a corrupt image, not a reason to spin.
  for (let depth = 0; depth < 64; depth++) {
    let next: string | undefined;
    try {
      next = backingFile(cur);
    } catch {
      break;
    }
    if (!next || chain.includes(next)) break;
    chain.push(next);
    cur = next;
  }
  return chain;
}

/**
 * Files any process on the host has open or mapped, limited to those under `prefixes`, with the
 * pid of one holder each. A running QEMU holds its disk's whole chain open and maps its memory
 * file, whichever daemon (of whatever version) started it. `hidden` counts processes whose fds
 * could not be read (another user's, when not running as root).
 */
export function openFiles(prefixes: string[]): { files: Map<string, number>; hidden: number } {
  const files = new Map<string, number>();
  let hidden = 0;
  const want = (p: string): boolean => prefixes.some((x) => p === x || p.startsWith(`${x}/`));
  for (const pidName of readdirSync('/proc')) {
    if (!/^\d+$/.test(pidName)) continue;
    const pid = Number(pidName);
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EACCES') hidden++;
      continue;
    }
    for (const fd of fds) {
      try {
        const target = readlinkSync(`/proc/${pid}/fd/${fd}`).replace(/ \(deleted\)$/, '');
        if (want(target)) files.set(target, pid);
      } catch {
        // closed meanwhile
      }
    }
    try {
      for (const line of readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
        const i = line.indexOf('/');
        if (i < 0) continue;
        const target = line.slice(i).replace(/ \(deleted\)$/, '');
        if (want(target)) files.set(target, pid);
      }
    } catch {
      // exited meanwhile
    }
  }
  return { files, hidden };
}
