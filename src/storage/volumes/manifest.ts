import { HutchError } from '../../errors.js';

/**
 * A volume's contents at one version: every entry under the volume's root, in an order where a
 * directory always comes before what it holds (what tar writes, and what a restore replays).
 * A file's bytes are `size` bytes at offset `off` of segment `seg` (volumes/<id>/seg/<seg>);
 * an empty file has no segment. Hard links of a saved tree are plain file entries sharing the
 * bytes of the file they link to; devices and FIFOs are not kept.
 */
export interface Entry {
  /** Relative to the volume's root, normalized: no leading "/", no ".", "..", empty components or NUL. */
  path: string;
  type: 'file' | 'dir' | 'symlink';
  /** Permission bits with setuid/setgid/sticky (0o7777). */
  mode: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch (what tar keeps). */
  mtime: number;
  /** Bytes of a file; 0 for the others. */
  size: number;
  seg: string | null;
  off: number;
  /** A symlink's target, as it is (never followed on the host). */
  target?: string;
}

export interface Manifest {
  format: 1;
  /** Bumped by every commit; 0: the empty volume as created. */
  generation: number;
  /** When this version was committed. */
  updated_at: string;
  entries: Entry[];
}

/** One path component's and one path's longest (Linux's NAME_MAX and PATH_MAX). */
const maxComponentBytes = 255;
const maxPathBytes = 4095;

/**
 * Normalizes a path inside a volume, or says why it is not one. A leading "/" means the volume's
 * root; "." and empty components go; "..", NUL and an empty result are refused (null + reason).
 */
export function normalizePath(raw: string): { path: string } | { error: string } {
  if (raw.includes('\0')) return { error: 'contains NUL' };
  const parts: string[] = [];
  for (const c of raw.split('/')) {
    if (c === '' || c === '.') continue;
    if (c === '..') return { error: 'contains ".."' };
    if (Buffer.byteLength(c) > maxComponentBytes)
      return { error: `a component is over ${maxComponentBytes} bytes` };
    parts.push(c);
  }
  if (parts.length === 0) return { error: 'names the volume root, not a file' };
  const path = parts.join('/');
  if (Buffer.byteLength(path) > maxPathBytes) return { error: `over ${maxPathBytes} bytes` };
  return { path };
}

/** A path from an API caller (?path=): INVALID_ARGUMENT unless it is a path inside the volume. */
export function apiPath(raw: string | undefined): string {
  if (raw === undefined || raw === '')
    throw new HutchError('INVALID_ARGUMENT', 'path: required (a path inside the volume)');
  const r = normalizePath(raw);
  if ('error' in r) throw new HutchError('INVALID_ARGUMENT', `path ${JSON.stringify(raw)}: ${r.error}`);
  return r.path;
}

export function parentOf(path: string): string | null {
  const i = path.lastIndexOf('/');
  return i < 0 ? null : path.slice(0, i);
}

export function emptyManifest(): Manifest {
  return { format: 1, generation: 0, updated_at: new Date().toISOString(), entries: [] };
}

/**
 * A manifest being built (a save, a PUT): entries by path, in order. Replacing an entry keeps
 * its place; a new entry gets its missing parents first (directories 0755 owned by root).
 */
export class ManifestBuilder {
  private readonly order: string[] = [];
  private readonly byPath = new Map<string, Entry>();

  constructor(from: Entry[] = []) {
    for (const e of from) this.set(e);
  }

  get(path: string): Entry | undefined {
    return this.byPath.get(path);
  }

  get count(): number {
    return this.byPath.size;
  }

  /**
   * Adds or replaces an entry. Refused (the reason is returned) when a parent is a file or a
   * symlink, or when a directory would replace a non-directory that has entries under it.
   */
  set(e: Entry, mtime = Math.floor(Date.now() / 1000)): string | undefined {
    const missing: string[] = [];
    for (let p = parentOf(e.path); p !== null; p = parentOf(p)) {
      const parent = this.byPath.get(p);
      if (parent) {
        if (parent.type !== 'dir') return `${JSON.stringify(p)} is a ${parent.type}, not a directory`;
        break;
      }
      missing.push(p);
    }
    const old = this.byPath.get(e.path);
    if (old && old.type === 'dir' && e.type !== 'dir' && this.hasChildren(e.path))
      return `${JSON.stringify(e.path)} is a directory with entries`;
    for (const p of missing.reverse()) {
      this.order.push(p);
      this.byPath.set(p, {
        path: p,
        type: 'dir',
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime,
        size: 0,
        seg: null,
        off: 0,
      });
    }
    if (!old) this.order.push(e.path);
    this.byPath.set(e.path, e);
    return undefined;
  }

  private hasChildren(dir: string): boolean {
    const prefix = `${dir}/`;
    for (const p of this.byPath.keys()) if (p.startsWith(prefix)) return true;
    return false;
  }

  entries(): Entry[] {
    return this.order.map((p) => this.byPath.get(p) as Entry);
  }
}

/** What GET /v1/volumes/{id} reports of a version. */
export function usageOf(m: Manifest): { bytes: number; files: number; dirs: number; symlinks: number } {
  let bytes = 0;
  let files = 0;
  let dirs = 0;
  let symlinks = 0;
  for (const e of m.entries) {
    if (e.type === 'file') {
      files++;
      bytes += e.size;
    } else if (e.type === 'dir') dirs++;
    else symlinks++;
  }
  return { bytes, files, dirs, symlinks };
}

/** The segments a version's files are in. */
export function segmentsOf(m: Manifest): Set<string> {
  const s = new Set<string>();
  for (const e of m.entries) if (e.seg) s.add(e.seg);
  return s;
}

/**
 * A manifest read back from the store, checked entry by entry: whoever else can write the
 * bucket must not be able to make a restore write outside /root or a download read past a
 * segment. Anything off is STORAGE_UNAVAILABLE (the store holds something hutch did not write).
 */
export function parseManifest(data: Buffer, where: string): Manifest {
  const bad = (why: string): HutchError =>
    new HutchError('STORAGE_UNAVAILABLE', `the volume store holds a broken manifest (${where}): ${why}`);
  let m: Manifest;
  try {
    m = JSON.parse(data.toString('utf8')) as Manifest;
  } catch (e) {
    throw bad((e as Error).message);
  }
  if (m?.format !== 1 || !Array.isArray(m.entries) || !Number.isInteger(m.generation))
    throw bad('not format 1');
  const seen = new Set<string>();
  const nat = (x: unknown): boolean => Number.isSafeInteger(x) && (x as number) >= 0;
  for (const e of m.entries) {
    const n = typeof e?.path === 'string' ? normalizePath(e.path) : { error: 'no path' };
    if ('error' in n || n.path !== e.path) throw bad(`entry ${JSON.stringify(e?.path)}: bad path`);
    if (seen.has(e.path)) throw bad(`entry ${JSON.stringify(e.path)} twice`);
    const parent = parentOf(e.path);
    if (parent !== null && !seen.has(parent))
      throw bad(`entry ${JSON.stringify(e.path)} before its directory`);
    seen.add(e.path);
    if (!['file', 'dir', 'symlink'].includes(e.type)) throw bad(`entry ${JSON.stringify(e.path)}: type`);
    if (!nat(e.mode) || e.mode > 0o7777 || !nat(e.uid) || !nat(e.gid) || typeof e.mtime !== 'number')
      throw bad(`entry ${JSON.stringify(e.path)}: attributes`);
    if (!nat(e.size) || !nat(e.off)) throw bad(`entry ${JSON.stringify(e.path)}: size`);
    if (e.type === 'file' && e.size > 0 && (typeof e.seg !== 'string' || !/^[a-z2-7]{1,64}$/.test(e.seg)))
      throw bad(`entry ${JSON.stringify(e.path)}: segment`);
    if (e.type === 'symlink' && (typeof e.target !== 'string' || e.target.includes('\0')))
      throw bad(`entry ${JSON.stringify(e.path)}: target`);
  }
  return m;
}
