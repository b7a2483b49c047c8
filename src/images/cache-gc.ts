import { randomBytes } from 'node:crypto';
import { existsSync, lstatSync, readdirSync, readFileSync, realpathSync, renameSync } from 'node:fs';
import { lstat, readdir, rm } from 'node:fs/promises';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { processAlive } from '../process-alive.js';
import { type BuildKeys, TemplateBuilder } from './builder.js';
import {
  backingChain,
  forgetHolder,
  openFiles,
  readHolders,
  readStateDirHolds,
  registerHolder,
  type StateDirHolds,
} from './cache-holders.js';
import { acquireFileLock } from './file-lock.js';
import { digestHex, imageDiskName } from './oci.js';
import { snapshotFormat } from './snapshots.js';

/**
 * The image cache's garbage collector. Artifacts are content-addressed, so a changed recipe, agent,
 * kernel or tag leaves the old ones behind forever unless something removes them. An artifact is
 * removed only when all of these hold:
 *   1. it is not current for any build of hutch using the cache (this one's keys, and those of
 *      every registered daemon that is running): what a create would resolve to now;
 *   2. no machine, box or pooled machine of any registered state dir depends on it (rows, and
 *      the backing chain of every disk in their run dirs), nor does a kept artifact (a snapshot's
 *      disk is an overlay of a template; an image disk boots the kernel of kernels/);
 *   3. no process has one of its files open or mapped (a running QEMU of any daemon, of any
 *      version, registered or not);
 *   4. it has not been built or used for `minAgeMs` (resolving one bumps its mtime);
 *   5. no build holds .build.lock (for kernels, root filesystems and templates, which builds read).
 * Temporary directories of builds are left alone while their builder (the pid in their name) is
 * alive. A removal renames the entry out of sight first, so nothing ever sees half an artifact.
 */

export type CacheKind =
  | 'templates'
  | 'kernels'
  | 'rootfs'
  | 'image-pulls'
  | 'image-disks'
  | 'image-refs'
  | 'snapshots'
  | 'exec-logs'
  | 'run-dirs';

const artifactDirs: [CacheKind, string][] = [
  ['templates', 'templates'],
  ['kernels', 'kernels'],
  ['rootfs', 'rootfs'],
  ['image-pulls', 'oci/pulls'],
  ['image-disks', 'oci/disks'],
  ['snapshots', 'snapshots'],
];

/**
 * A tag's last digest is current while the tag was resolved within this time: a tag nobody
 * asks for any more (a test registry's, say) stops holding its image, and its record goes.
 */
export const tagLifetimeMs = 30 * 24 * 3600 * 1000;

/** Kinds a template build reads while holding .build.lock. */
const builtUnderLock = new Set<CacheKind>(['templates', 'kernels', 'rootfs']);

export interface CacheGcOptions {
  imageDir: string;
  /** This daemon's (or the CLI's) state dir: its rows hold artifacts, its orphan exec logs go. */
  stateDir: string;
  /** Anything built or used more recently than this is kept. */
  minAgeMs: number;
  dryRun?: boolean;
  /** The daemon's pid, registered as a holder with its keys; omitted by the CLI. */
  daemonPid?: number;
  /** The current keys; computed from this checkout when omitted. */
  keys?: BuildKeys;
}

export interface GcEntry {
  kind: CacheKind;
  path: string;
  bytes: number;
  reason: string;
}

export interface GcReport {
  dry_run: boolean;
  image_dir: string;
  state_dir: string;
  min_age_seconds: number;
  /** Everything removed (or, in a dry run, that would be). */
  freed: { count: number; bytes: number };
  kinds: Record<CacheKind, { removed: number; bytes: number; kept: number }>;
  removed: GcEntry[];
  kept: { kind: CacheKind; path: string; reason: string }[];
  /** Why less than usual could be collected (a store that cannot be read, hidden processes). */
  warnings: string[];
}

interface Candidate {
  kind: CacheKind;
  path: string;
  reason: string;
  /** mtime (ms) when judged: a later one means it was used since, and it is kept. */
  mtimeMs: number;
}

const tmpPid = (name: string): number | undefined => {
  const m = /\.tmp-(\d+)/.exec(name) ?? /^\.gc-(\d+)-/.exec(name);
  return m ? Number(m[1]) : undefined;
};

export async function collectCacheGarbage(opts: CacheGcOptions): Promise<GcReport> {
  const imageDir = resolve(opts.imageDir);
  const stateDir = resolve(opts.stateDir);
  const dryRun = opts.dryRun === true;
  const now = Date.now();
  const report: GcReport = {
    dry_run: dryRun,
    image_dir: imageDir,
    state_dir: stateDir,
    min_age_seconds: Math.round(opts.minAgeMs / 1000),
    freed: { count: 0, bytes: 0 },
    kinds: Object.fromEntries(
      [...artifactDirs.map(([k]) => k), 'image-refs', 'exec-logs', 'run-dirs'].map((k) => [
        k,
        { removed: 0, bytes: 0, kept: 0 },
      ]),
    ) as GcReport['kinds'],
    removed: [],
    kept: [],
    warnings: [],
  };
  if (!existsSync(imageDir)) return report;
  const release = await acquireFileLock(join(imageDir, '.gc.lock'));
  try {
    const keys = opts.keys ?? (await new TemplateBuilder(imageDir).currentKeys());
    if (!dryRun) registerHolder(imageDir, stateDir, opts.daemonPid ?? null, opts.daemonPid ? keys : null);

    // What is kept, and the first reason found, by artifact id (e.g. "oci/disks/<name>").
    const keep = new Map<string, string>();
    const hold = (id: string | undefined, why: string): void => {
      if (id && !keep.has(id)) keep.set(id, why);
    };
    const idOf = artifactIdResolver(imageDir);
    const inventory = listArtifacts(imageDir);

    // 1. Current for this build and for every running registered daemon.
    const holders = readHolders(imageDir);
    const keySets: [BuildKeys, string][] = [[keys, 'current']];
    for (const h of holders)
      if (
        h.keys &&
        h.pid !== null &&
        h.pid !== process.pid &&
        h.state_dir !== stateDir &&
        processAlive(h.pid)
      )
        keySets.push([h.keys, `current for the running daemon of ${h.state_dir}`]);
    const refs = refDigests(imageDir);
    const tags = refs.filter((r) => now - r.mtimeMs < tagLifetimeMs).map((r) => r.digest);
    for (const [k, why] of keySets) for (const id of currentIds(k, tags, inventory)) hold(id, why);

    // 2. Held by the rows and run dirs of every registered state dir (this one's included).
    let blocked = false;
    let own: StateDirHolds | undefined;
    const stateDirs = new Set([stateDir, ...holders.map((h) => h.state_dir)]);
    for (const dir of stateDirs) {
      if (!existsSync(dir)) {
        if (!dryRun) forgetHolder(imageDir, dir);
        continue;
      }
      try {
        const holds = readStateDirHolds(dir, imageDir);
        if (dir === stateDir) own = holds;
        for (const p of holds.paths) hold(idOf(p), `used by a machine or box of ${dir}`);
      } catch (e) {
        // Not knowing what a daemon uses means not knowing what is garbage.
        blocked = true;
        report.warnings.push(
          `cannot read what ${dir} uses (${(e as Error).message}): nothing is removed; remove ${dir} or its record in ${join(imageDir, 'holders')} if it is gone for good`,
        );
      }
    }

    // 3. Open or mapped by any process.
    const open = openFiles([imageDir, realpathOr(imageDir), join(stateDir, 'run')]);
    for (const [file, pid] of open.files) hold(idOf(file), `open by pid ${pid}`);
    if (open.hidden > 0 && process.getuid?.() !== 0)
      report.warnings.push(
        `the open files of ${open.hidden} processes cannot be read (not root): an artifact only they use could be removed`,
      );

    // Snapshots of a current template or image are current (whatever accelerator, size or
    // command line they were taken with); then whatever a kept artifact refers to is kept.
    for (const a of inventory.artifacts) {
      if (a.kind !== 'snapshots' || keep.has(a.id)) continue;
      const base = snapshotBase(join(imageDir, a.id));
      if (
        base &&
        keep.get(idOf(base) ?? '')?.startsWith('current') &&
        snapshotFormatOf(join(imageDir, a.id)) === snapshotFormat
      )
        hold(a.id, 'a snapshot of a current template or image');
    }
    const queue = [...keep.keys()];
    while (queue.length > 0) {
      const id = queue.pop() as string;
      for (const ref of references(join(imageDir, id))) {
        const refId = idOf(ref);
        if (refId && !keep.has(refId)) {
          keep.set(refId, `used by ${id}`);
          queue.push(refId);
        }
      }
    }

    // 5. A build in progress reads kernels and root filesystems it has not marked yet.
    const building = lockHeld(join(imageDir, '.build.lock'));

    const candidates: Candidate[] = [];
    for (const a of inventory.artifacts) {
      const path = join(imageDir, a.id);
      const mtimeMs = mtimeOf(path);
      const why =
        keep.get(a.id) ??
        (building && builtUnderLock.has(a.kind) ? 'a build is in progress' : undefined) ??
        (now - mtimeMs < opts.minAgeMs ? 'built or used recently' : undefined);
      if (why) {
        report.kept.push({ kind: a.kind, path, reason: why });
        report.kinds[a.kind].kept++;
      } else candidates.push({ kind: a.kind, path, reason: 'unused', mtimeMs });
    }
    for (const t of inventory.temps) {
      const pid = tmpPid(basename(t.path));
      if (pid === undefined || pid === process.pid || processAlive(pid)) continue;
      const mtimeMs = mtimeOf(t.path);
      // A collector's leftovers are garbage already; a build's wait out the minimum age.
      const gcLeftover = basename(t.path).startsWith('.gc-');
      if (gcLeftover || now - mtimeMs >= opts.minAgeMs)
        candidates.push({
          ...t,
          reason: gcLeftover ? 'left by an interrupted collection' : 'left by a build that died',
          mtimeMs,
        });
    }

    for (const r of refs)
      if (now - r.mtimeMs >= tagLifetimeMs)
        candidates.push({
          kind: 'image-refs',
          path: r.path,
          reason: 'tag not resolved for 30 days',
          mtimeMs: r.mtimeMs,
        });

    // Exec logs and run dirs of this state dir that no row knows of (a crash between steps).
    if (own) {
      const runOpen = [...open.files.keys()];
      for (const dir of own.runDirs) {
        const id = basename(dir);
        if (!own.machineIds.has(id)) {
          const busy = runOpen.some((f) => f.startsWith(`${dir}/`));
          const mtimeMs = mtimeOf(dir);
          if (!busy && now - mtimeMs >= opts.minAgeMs)
            candidates.push({ kind: 'run-dirs', path: dir, reason: 'no machine or box has it', mtimeMs });
          continue;
        }
        const execs = join(dir, 'execs');
        if (!existsSync(execs)) continue;
        for (const f of readdirSync(execs)) {
          const m = /^(.+)\.ndjson$/.exec(f);
          if (!m?.[1] || own.execIds.has(m[1])) continue;
          const path = join(execs, f);
          const mtimeMs = mtimeOf(path);
          if (now - mtimeMs >= opts.minAgeMs)
            candidates.push({ kind: 'exec-logs', path, reason: 'no exec has it', mtimeMs });
        }
      }
    }

    if (blocked) return report;
    for (const c of candidates) {
      const bytes = await diskUsage(c.path);
      if (!dryRun && !(await remove(c))) {
        report.kept.push({ kind: c.kind, path: c.path, reason: 'used while being collected' });
        report.kinds[c.kind].kept++;
        continue;
      }
      report.removed.push({ kind: c.kind, path: c.path, bytes, reason: c.reason });
      report.kinds[c.kind].removed++;
      report.kinds[c.kind].bytes += bytes;
      report.freed.count++;
      report.freed.bytes += bytes;
    }
    return report;
  } finally {
    release();
  }
}

/**
 * Renames the entry out of sight, then deletes it. An entry used since it was judged (its
 * mtime moved: markUsed) is put back instead; so is one a process opened meanwhile.
 */
async function remove(c: Candidate): Promise<boolean> {
  if (mtimeOf(c.path) !== c.mtimeMs) return false;
  const name = basename(c.path);
  const trash = name.startsWith('.gc-')
    ? c.path
    : join(dirname(c.path), `.gc-${process.pid}-${randomBytes(3).toString('hex')}-${name}`);
  if (trash !== c.path) {
    try {
      renameSync(c.path, trash);
    } catch {
      return false;
    }
    if (mtimeOf(trash) !== c.mtimeMs || openFiles([trash]).files.size > 0) {
      renameSync(trash, c.path);
      return false;
    }
  }
  await rm(trash, { recursive: true, force: true });
  return true;
}

interface Inventory {
  artifacts: { kind: CacheKind; id: string }[];
  /** Temporary directories of builds and of interrupted collections. */
  temps: { kind: CacheKind; path: string }[];
}

function listArtifacts(imageDir: string): Inventory {
  const inv: Inventory = { artifacts: [], temps: [] };
  for (const [kind, sub] of artifactDirs) {
    const dir = join(imageDir, sub);
    let entries: string[];
    try {
      entries = readdirSync(dir);
    } catch {
      continue;
    }
    for (const e of entries) {
      if (tmpPid(e) !== undefined) inv.temps.push({ kind, path: join(dir, e) });
      // Lock files and anything else starting with a dot are never artifacts.
      else if (!e.startsWith('.') && isDir(join(dir, e))) inv.artifacts.push({ kind, id: `${sub}/${e}` });
    }
  }
  return inv;
}

/** The ids of what a build with `keys` resolves to now (image disks: for every tag's last digest). */
function currentIds(keys: BuildKeys, pulled: string[], inv: Inventory): string[] {
  const ids = [
    ...Object.entries(keys.templates).map(([name, key]) => `templates/${name}-${key}`),
    `kernels/${keys.kernel}`,
    ...keys.rootfs.map((k) => `rootfs/${k}`),
  ];
  for (const d of pulled) ids.push(`oci/pulls/${digestHex(d)}`);
  for (const d of [...pulled, ...(keys.localImages ?? [])]) {
    if (keys.agent) ids.push(`oci/disks/${imageDiskName(d, keys.agent, keys.kernel)}`);
    else {
      // No agent built: any disk of this digest may be the one the next build resolves to.
      const prefix = `oci/disks/${digestHex(d).slice(0, 16)}-`;
      for (const a of inv.artifacts) if (a.id.startsWith(prefix)) ids.push(a.id);
    }
  }
  return ids;
}

/** The digest each pulled tag last resolved to (oci/refs/, rewritten at every resolve). */
function refDigests(imageDir: string): { path: string; digest: string; mtimeMs: number }[] {
  const dir = join(imageDir, 'oci', 'refs');
  const out: { path: string; digest: string; mtimeMs: number }[] = [];
  if (!existsSync(dir)) return out;
  for (const f of readdirSync(dir)) {
    if (!f.endsWith('.json') || f.startsWith('.')) continue;
    const path = join(dir, f);
    try {
      const d = (JSON.parse(readFileSync(path, 'utf8')) as { digest?: unknown }).digest;
      if (typeof d === 'string' && /^sha256:[a-f0-9]{64}$/.test(d))
        out.push({ path, digest: d, mtimeMs: mtimeOf(path) });
    } catch {
      // not a record of ours (they are renamed into place, never half-written)
    }
  }
  return out;
}

/** Maps a path to the id of the artifact it lies in (also through symlinks to the cache). */
function artifactIdResolver(imageDir: string): (path: string) => string | undefined {
  const roots = [...new Set([imageDir, realpathOr(imageDir)])];
  const match = (p: string): string | undefined => {
    for (const root of roots) {
      const rel = relative(root, p);
      if (rel.startsWith('..') || rel === '') continue;
      const parts = rel.split('/');
      const [a, b, c] = parts;
      if (
        (a === 'templates' || a === 'kernels' || a === 'rootfs' || a === 'snapshots') &&
        b &&
        !b.startsWith('.')
      )
        return `${a}/${b}`;
      if (a === 'oci' && (b === 'pulls' || b === 'disks') && c && !c.startsWith('.')) return `oci/${b}/${c}`;
    }
    return undefined;
  };
  return (path) => match(resolve(path)) ?? (existsSync(path) ? match(realpathOr(path)) : undefined);
}

/** What an artifact's own files name: a manifest's kernel and disk, a qcow2's backing chain. */
function references(dir: string): string[] {
  const refs: string[] = [];
  for (const f of ['manifest.json', 'meta.json']) {
    try {
      const j = JSON.parse(readFileSync(join(dir, f), 'utf8')) as Record<string, unknown>;
      for (const v of Object.values(j)) if (typeof v === 'string' && v.startsWith('/')) refs.push(v);
    } catch {
      // not this kind of artifact
    }
  }
  let entries: string[] = [];
  try {
    entries = readdirSync(dir);
  } catch {
    // gone
  }
  for (const f of entries) if (f.endsWith('.qcow2')) refs.push(...backingChain(join(dir, f)));
  return refs;
}

/** The template's or image's root filesystem a snapshot's disk is an overlay of. */
function snapshotBase(dir: string): string | undefined {
  const chain = existsSync(join(dir, 'disk.qcow2')) ? backingChain(join(dir, 'disk.qcow2')) : [];
  return chain[chain.length - 1];
}

/** The format field of a snapshot's key: <hash>-<accel>-<vcpus>-<memory>-<format>-<cmdline>[-d<size>]. */
function snapshotFormatOf(dir: string): string | undefined {
  try {
    const key = (JSON.parse(readFileSync(join(dir, 'meta.json'), 'utf8')) as { key?: unknown }).key;
    return typeof key === 'string' ? key.split('-')[4] : undefined;
  } catch {
    return undefined;
  }
}

function lockHeld(path: string): boolean {
  try {
    const pid = Number(readFileSync(path, 'utf8'));
    return Number.isInteger(pid) && pid > 0 && processAlive(pid);
  } catch {
    return false;
  }
}

function mtimeOf(path: string): number {
  try {
    return lstatSync(path).mtimeMs;
  } catch {
    return 0;
  }
}

function isDir(path: string): boolean {
  try {
    return lstatSync(path).isDirectory();
  } catch {
    return false;
  }
}

function realpathOr(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

/** Bytes a tree takes on disk (allocated blocks: sparse images count what they use), hard links once. */
async function diskUsage(path: string): Promise<number> {
  const seen = new Set<string>();
  let total = 0;
  const walk = async (p: string): Promise<void> => {
    let st: Awaited<ReturnType<typeof lstat>>;
    try {
      st = await lstat(p);
    } catch {
      return;
    }
    const key = `${st.dev}:${st.ino}`;
    if (seen.has(key)) return;
    seen.add(key);
    total += st.blocks * 512;
    if (!st.isDirectory()) return;
    let entries: string[];
    try {
      entries = await readdir(p);
    } catch {
      return;
    }
    for (const e of entries) await walk(join(p, e));
  };
  await walk(path);
  return total;
}
