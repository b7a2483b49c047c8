import { Readable } from 'node:stream';
import type { Log } from '../../background.js';
import { HutchError } from '../../errors.js';
import { type BlobStore, isBlobNotFound } from './blob-store.js';
import { type TarGuest, tarIn, tarOut } from './guest-tar.js';
import {
  apiPath,
  type Entry,
  emptyManifest,
  type Manifest,
  ManifestBuilder,
  parseManifest,
  segmentsOf,
  usageOf,
} from './manifest.js';
import { SegmentReader } from './segment-reader.js';
import { SegmentWriter } from './segment-writer.js';
import { emitTar } from './tar-emit.js';
import { type Skipped, TarIngest } from './tar-ingest.js';
import { isVolumeId, newSegmentId, newVolumeId } from './volume-ids.js';
import { VolumeUses } from './volume-uses.js';

/** volume.json: who owns the volume and for how long. Written once, at create. */
export interface VolumeMeta {
  id: string;
  owner: string;
  created_at: string;
  ttl_seconds: number;
  expires_at: string;
}

/** A volume as the APIs show it: its metadata and its current version's usage. */
export interface VolumeView {
  id: string;
  created_at: string;
  expires_at: string;
  ttl_seconds: number;
  /** Sum of the files' sizes. */
  bytes: number;
  files: number;
  dirs: number;
  symlinks: number;
  /** Commits so far (0: never written). */
  generation: number;
  updated_at: string;
}

/** One entry of GET /v1/volumes/{id}/files. */
export interface FileView {
  path: string;
  type: Entry['type'];
  /** Octal, with setuid/setgid/sticky ("0644", "4755"). */
  mode: string;
  uid: number;
  gid: number;
  size: number;
  mtime: string;
  target?: string;
}

export interface SaveView {
  volume: VolumeView;
  files: number;
  bytes: number;
  skipped: Skipped;
  warnings: string;
  duration_ms: number;
}

export interface VolumeLimits {
  maxBytes: number;
  maxFiles: number;
  maxPerUser: number;
  ttlDefaultSeconds: number;
  ttlMinSeconds: number;
  ttlMaxSeconds: number;
}

export const volumeTtl = { default: 7 * 86_400, min: 60, max: 365 * 86_400 };

/** A volume held for a restore: its version is read once; `release` exactly once. */
export interface VolumeLease {
  meta: VolumeMeta;
  release(): void;
}

/** A file being read from a volume (GET …/file). */
export interface VolumeFile {
  path: string;
  size: number;
  mode: number;
  /** The bytes; the volume counts as in use until the stream closes. */
  stream: Readable;
}

const volumeKey = (id: string): string => `${id}/volume.json`;
const manifestKey = (id: string): string => `${id}/manifest.json`;
const segKey =
  (id: string) =>
  (seg: string): string =>
    `${id}/seg/${seg}`;

const notFound = (id: string): HutchError =>
  new HutchError('VOLUME_NOT_FOUND', `no volume ${JSON.stringify(id)}`);

/**
 * Persistent volumes (docs/volumes.md): a volume is `<id>/volume.json` + `<id>/manifest.json`
 * (its current version) + segments `<id>/seg/<name>` holding file contents, all in a BlobStore
 * (a local directory or an S3 bucket), so a volume describes itself to any host.
 *
 * A new version (a save, a PUT) writes a new segment first and then replaces manifest.json in
 * one atomic put: until that commit every reader sees the previous version whole, and an
 * interrupted write leaves only an unreferenced segment for the collector. Writers of one
 * volume take its lock (one at a time, in this process); readers and restores pin the volume
 * (VolumeUses), so the collector never removes what they read and DELETE answers VOLUME_BUSY.
 */
export class VolumeService {
  private readonly uses = new VolumeUses();
  /** volume.json never changes: read once per id. */
  private readonly metas = new Map<string, VolumeMeta>();
  private readonly creates = new Map<string, Promise<unknown>>();
  private gcTimer: NodeJS.Timeout | undefined;
  private gcRunning: Promise<unknown> | undefined;

  constructor(
    readonly store: BlobStore,
    private readonly limits: VolumeLimits,
    private readonly gc: { intervalMs: number; graceMs: number },
    private readonly log: Log,
  ) {}

  // ---- metadata -----------------------------------------------------------------------------

  async create(owner: string, ttlSeconds?: number): Promise<VolumeView> {
    const ttl = ttlSeconds ?? this.limits.ttlDefaultSeconds;
    if (!Number.isInteger(ttl) || ttl < this.limits.ttlMinSeconds || ttl > this.limits.ttlMaxSeconds)
      throw new HutchError(
        'INVALID_ARGUMENT',
        `ttl_seconds: a whole number from ${this.limits.ttlMinSeconds} to ${this.limits.ttlMaxSeconds}`,
      );
    // One create per owner at a time: the count below must not race another create.
    const prev = this.creates.get(owner) ?? Promise.resolve();
    const run = prev
      .catch(() => {})
      .then(async () => {
        const mine = await this.metasOf(owner);
        if (mine.length >= this.limits.maxPerUser)
          throw new HutchError(
            'RESOURCE_EXHAUSTED',
            `you have ${mine.length} volumes, the most one user may have (HUTCH_VOLUME_MAX_PER_USER); delete one first`,
          );
        const now = new Date();
        const meta: VolumeMeta = {
          id: newVolumeId(),
          owner,
          created_at: now.toISOString(),
          ttl_seconds: ttl,
          expires_at: new Date(now.getTime() + ttl * 1000).toISOString(),
        };
        // volume.json first: a prefix without one is a leftover of a delete (collected).
        await this.store.putSmall(volumeKey(meta.id), Buffer.from(JSON.stringify(meta)));
        const m = emptyManifest();
        await this.store.putSmall(manifestKey(meta.id), Buffer.from(JSON.stringify(m)));
        this.metas.set(meta.id, meta);
        return this.viewOf(meta, m);
      });
    this.creates.set(owner, run);
    try {
      return await run;
    } finally {
      if (this.creates.get(owner) === run) this.creates.delete(owner);
    }
  }

  async list(owner: string): Promise<VolumeView[]> {
    const out: VolumeView[] = [];
    for (const meta of await this.metasOf(owner)) {
      try {
        out.push(this.viewOf(meta, await this.manifest(meta.id)));
      } catch (e) {
        if (!(e instanceof HutchError && e.code === 'VOLUME_NOT_FOUND')) throw e;
      }
    }
    return out;
  }

  async get(owner: string, id: string): Promise<VolumeView> {
    const meta = await this.find(owner, id);
    return this.viewOf(meta, await this.manifest(id));
  }

  /** Removes a volume now: VOLUME_BUSY while anything reads or writes it. */
  async delete(owner: string, id: string): Promise<void> {
    await this.find(owner, id);
    if (!this.uses.tryRemove(id))
      throw new HutchError(
        'VOLUME_BUSY',
        `volume ${id} is being saved into, restored or read; delete it when that has finished`,
      );
    try {
      await this.remove(id);
    } finally {
      this.uses.removed(id);
    }
  }

  async files(owner: string, id: string): Promise<FileView[]> {
    await this.find(owner, id);
    return (await this.manifest(id)).entries.map(fileView);
  }

  // ---- files --------------------------------------------------------------------------------

  /**
   * Streams `body` into the volume as `rawPath` (a new segment, then a new version with that
   * entry; missing parent directories are added, 0755). Over the volume's byte limit is
   * VOLUME_TOO_LARGE and the version stays as it was.
   */
  async putFile(
    owner: string,
    id: string,
    rawPath: string | undefined,
    body: Readable,
    opts: { mode?: number; size?: number } = {},
  ): Promise<{ path: string; size: number; volume: VolumeView }> {
    const path = apiPath(rawPath);
    const mode = opts.mode ?? 0o644;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777)
      throw new HutchError('INVALID_ARGUMENT', 'mode: octal permission bits, at most 7777');
    await this.find(owner, id);
    return this.uses.write(id, async () => {
      await this.find(owner, id);
      const prev = await this.manifest(id);
      const b = new ManifestBuilder(prev.entries);
      const old = b.get(path);
      if (old?.type === 'dir') throw new HutchError('NOT_A_FILE', `${JSON.stringify(path)} is a directory`);
      const probe: Entry = { path, type: 'file', mode, uid: 0, gid: 0, mtime: 0, size: 0, seg: null, off: 0 };
      const why = new ManifestBuilder(prev.entries).set(probe);
      if (why) throw new HutchError('INVALID_ARGUMENT', `path ${JSON.stringify(path)}: ${why}`);
      const room = this.limits.maxBytes - (usageOf(prev).bytes - (old?.size ?? 0));
      if (opts.size !== undefined && opts.size > room) throw tooLarge(this.limits.maxBytes);
      if (!old && prev.entries.length + path.split('/').length > this.limits.maxFiles)
        throw new HutchError(
          'VOLUME_TOO_LARGE',
          `the volume would hold more than ${this.limits.maxFiles} entries`,
        );
      const seg = newSegmentId();
      const w = new SegmentWriter(this.store, segKey(id)(seg));
      let size = 0;
      try {
        for await (const chunk of body as AsyncIterable<Buffer>) {
          size += chunk.length;
          if (size > room) throw tooLarge(this.limits.maxBytes);
          await w.write(chunk);
        }
        if (opts.size !== undefined && size !== opts.size)
          throw new HutchError('INVALID_ARGUMENT', `the body ended after ${size} of ${opts.size} bytes`);
        await w.finish();
      } catch (e) {
        await w.abort(e instanceof Error ? e : new Error(String(e)));
        body.destroy();
        throw e;
      }
      b.set({
        ...probe,
        mtime: Math.floor(Date.now() / 1000),
        size,
        seg: size > 0 ? seg : null,
      });
      const next = await this.commit(id, prev, b.entries());
      if (size === 0) await this.store.delete([segKey(id)(seg)]).catch(() => {});
      return { path, size, volume: this.viewOf(await this.find(owner, id), next) };
    });
  }

  /** A file's bytes (FILE_NOT_FOUND, NOT_A_FILE for anything but a regular file). */
  async openFile(owner: string, id: string, rawPath: string | undefined): Promise<VolumeFile> {
    const path = apiPath(rawPath);
    await this.find(owner, id);
    const release = this.uses.use(id);
    try {
      const m = await this.manifest(id);
      const e = m.entries.find((x) => x.path === path);
      if (!e) throw new HutchError('FILE_NOT_FOUND', `no file ${JSON.stringify(path)} in volume ${id}`);
      if (e.type !== 'file') throw new HutchError('NOT_A_FILE', `${JSON.stringify(path)} is a ${e.type}`);
      const stream =
        e.size === 0 || !e.seg
          ? Readable.from([])
          : await this.store.get(segKey(id)(e.seg), { start: e.off, end: e.off + e.size - 1 });
      stream.once('close', release);
      return { path, size: e.size, mode: e.mode, stream };
    } catch (e) {
      release();
      throw e;
    }
  }

  // ---- machines -----------------------------------------------------------------------------

  /** Saves a machine's /root as the volume's new version (tar in the guest, parsed here). */
  /** `signal`: aborted, the save stops taking the guest's output and never commits. */
  async save(owner: string, id: string, guest: TarGuest, signal?: AbortSignal): Promise<SaveView> {
    await this.find(owner, id);
    const t0 = performance.now();
    return this.uses.write(id, async () => {
      await this.find(owner, id);
      const prev = await this.manifest(id);
      const ingest = new TarIngest(this.store, segKey(id), {
        maxBytes: this.limits.maxBytes,
        maxFiles: this.limits.maxFiles,
      });
      let warnings = '';
      try {
        ({ warnings } = await tarOut(guest, (chunk) => {
          signal?.throwIfAborted();
          return ingest.write(chunk);
        }));
      } catch (e) {
        // The parser's own failure (a refused archive) is the reason even when the guest's tar
        // reported something after it.
        const why = ingest.failed ?? e;
        await ingest.abort(why instanceof Error ? why : new Error(String(why)));
        throw why;
      }
      let r: Awaited<ReturnType<TarIngest['end']>>;
      try {
        r = await ingest.end();
      } catch (e) {
        await ingest.abort(e instanceof Error ? e : new Error(String(e)));
        throw e;
      }
      if (signal?.aborted) {
        await ingest.abort(new Error('the save was given up'));
        signal.throwIfAborted();
      }
      const next = await this.commit(id, prev, r.entries);
      const u = usageOf(next);
      this.log('info', 'volume saved', {
        volume: id,
        files: u.files,
        bytes: u.bytes,
        generation: next.generation,
      });
      return {
        volume: this.viewOf(await this.find(owner, id), next),
        files: u.files,
        bytes: u.bytes,
        skipped: r.skipped,
        warnings,
        duration_ms: Math.round(performance.now() - t0),
      };
    });
  }

  /** Checks the caller's volume and pins it, before a machine is made to restore it into. */
  async lease(owner: string, id: string): Promise<VolumeLease> {
    const meta = await this.find(owner, id);
    const release = this.uses.use(id);
    let released = false;
    return {
      meta,
      release: () => {
        if (released) return;
        released = true;
        release();
      },
    };
  }

  /** Unpacks the volume's current version into the machine's /root (tar in the guest). */
  async restore(lease: VolumeLease, guest: TarGuest): Promise<{ files: number; bytes: number }> {
    const id = lease.meta.id;
    const m = await this.manifest(id);
    const reader = new SegmentReader(this.store, segKey(id));
    try {
      await tarIn(guest, (sink) => emitTar(m.entries, reader, sink));
    } catch (e) {
      if (e instanceof HutchError) throw e;
      // A segment that ended early or a store that went away mid-read.
      throw new HutchError('STORAGE_UNAVAILABLE', `reading volume ${id} failed: ${(e as Error).message}`);
    } finally {
      reader.close();
    }
    const u = usageOf(m);
    return { files: u.files, bytes: u.bytes };
  }

  // ---- collection ---------------------------------------------------------------------------

  /** Collects at once, then every `intervalMs`. */
  start(): void {
    const tick = (): void => {
      if (this.gcRunning) return;
      this.gcRunning = this.collect()
        .then((r) => {
          if (r.volumes || r.objects) this.log('info', 'volumes collected', r);
        })
        .catch((e: unknown) => this.log('warn', 'volume collection failed', { error: (e as Error).message }))
        .finally(() => {
          this.gcRunning = undefined;
        });
    };
    tick();
    this.gcTimer = setInterval(tick, this.gc.intervalMs);
    this.gcTimer.unref();
  }

  async stop(): Promise<void> {
    if (this.gcTimer) clearInterval(this.gcTimer);
    this.gcTimer = undefined;
    await this.gcRunning;
  }

  /**
   * Removes expired volumes nothing uses, and in every other volume nothing uses the objects no
   * current version references (segments of replaced versions, of interrupted saves, temporary
   * files) once older than the grace period: another host may be reading a version that was
   * current a moment ago, or be about to commit the segment it has just written.
   */
  async collect(): Promise<{ volumes: number; objects: number }> {
    const r = { volumes: 0, objects: 0 };
    const now = Date.now();
    const old = new Date(now - this.gc.graceMs);
    const top = await this.store.list('', { delimiter: '/' });
    for (const prefix of top.prefixes) {
      const id = prefix.slice(0, -1);
      if (!isVolumeId(id) || this.uses.busy(id)) continue;
      let meta: VolumeMeta | undefined;
      try {
        meta = await this.meta(id);
      } catch (e) {
        if (!isBlobNotFound(e) && !(e instanceof HutchError && e.code === 'VOLUME_NOT_FOUND')) throw e;
      }
      if (!meta) {
        // A delete that did not finish: what it left, once nothing has been written for a while.
        const left = (await this.store.list(prefix)).objects;
        if (left.length && left.every((o) => o.mtime < old) && this.uses.tryRemove(id)) {
          try {
            await this.store.delete(left.map((o) => o.key));
            r.objects += left.length;
          } finally {
            this.uses.removed(id);
          }
        }
        continue;
      }
      if (Date.parse(meta.expires_at) <= now) {
        if (!this.uses.tryRemove(id)) continue;
        try {
          await this.remove(id);
          r.volumes++;
        } finally {
          this.uses.removed(id);
        }
        continue;
      }
      r.objects += await this.collectVolume(id, old);
    }
    if (this.store.collectLeftovers) r.objects += await this.store.collectLeftovers('', old);
    return r;
  }

  private async collectVolume(id: string, old: Date): Promise<number> {
    const keep = new Set([volumeKey(id), manifestKey(id)]);
    let m: Manifest;
    try {
      m = await this.manifest(id);
    } catch {
      return 0;
    }
    for (const s of segmentsOf(m)) keep.add(segKey(id)(s));
    const garbage = (await this.store.list(`${id}/`)).objects.filter(
      (o) => !keep.has(o.key) && o.mtime < old,
    );
    if (garbage.length === 0 || this.uses.busy(id)) return 0;
    await this.store.delete(garbage.map((o) => o.key));
    return garbage.length;
  }

  // ---- internals ----------------------------------------------------------------------------

  /** The caller's live volume: another owner's, an expired or a malformed id is VOLUME_NOT_FOUND. */
  private async find(owner: string, id: string): Promise<VolumeMeta> {
    if (!isVolumeId(id)) throw notFound(id);
    const meta = await this.meta(id);
    if (meta.owner !== owner || Date.parse(meta.expires_at) <= Date.now() || this.uses.removing(id))
      throw notFound(id);
    return meta;
  }

  private async meta(id: string): Promise<VolumeMeta> {
    const cached = this.metas.get(id);
    if (cached) return cached;
    let meta: VolumeMeta;
    try {
      meta = JSON.parse((await this.store.getSmall(volumeKey(id), 64 * 1024)).toString('utf8')) as VolumeMeta;
    } catch (e) {
      if (isBlobNotFound(e)) throw notFound(id);
      if (e instanceof SyntaxError)
        throw new HutchError('STORAGE_UNAVAILABLE', `the volume store holds a broken ${volumeKey(id)}`);
      throw e;
    }
    if (meta.id !== id || typeof meta.owner !== 'string' || Number.isNaN(Date.parse(meta.expires_at)))
      throw new HutchError('STORAGE_UNAVAILABLE', `the volume store holds a broken ${volumeKey(id)}`);
    this.metas.set(id, meta);
    return meta;
  }

  private async metasOf(owner: string): Promise<VolumeMeta[]> {
    const now = Date.now();
    const out: VolumeMeta[] = [];
    for (const prefix of (await this.store.list('', { delimiter: '/' })).prefixes) {
      const id = prefix.slice(0, -1);
      if (!isVolumeId(id) || this.uses.removing(id)) continue;
      try {
        const meta = await this.meta(id);
        if (meta.owner === owner && Date.parse(meta.expires_at) > now) out.push(meta);
      } catch (e) {
        if (!(e instanceof HutchError && e.code === 'VOLUME_NOT_FOUND')) throw e;
      }
    }
    return out.sort((a, b) => a.created_at.localeCompare(b.created_at));
  }

  private async manifest(id: string): Promise<Manifest> {
    try {
      return parseManifest(await this.store.getSmall(manifestKey(id)), manifestKey(id));
    } catch (e) {
      if (isBlobNotFound(e)) throw notFound(id);
      throw e;
    }
  }

  /** Makes `entries` the volume's current version: one atomic put of manifest.json. */
  private async commit(id: string, prev: Manifest, entries: Entry[]): Promise<Manifest> {
    const next: Manifest = {
      format: 1,
      generation: prev.generation + 1,
      updated_at: new Date().toISOString(),
      entries,
    };
    await this.store.putSmall(manifestKey(id), Buffer.from(JSON.stringify(next)));
    // Nobody else can be reading the old version's segments on a local store once nothing here
    // uses the volume: they go now rather than after the grace period. (On S3 another host may
    // be, so the collector's grace applies.)
    if (!this.store.shared && this.uses.count(id) <= 1) {
      const live = segmentsOf(next);
      const stale = [...segmentsOf(prev)].filter((s) => !live.has(s)).map(segKey(id));
      if (stale.length) await this.store.delete(stale).catch(() => {});
    }
    return next;
  }

  /** Removes every object of a volume, volume.json first (so it is gone for readers at once). */
  private async remove(id: string): Promise<void> {
    await this.store.delete([volumeKey(id)]);
    this.metas.delete(id);
    const rest = (await this.store.list(`${id}/`)).objects.map((o) => o.key);
    await this.store.delete(rest);
    this.log('info', 'volume removed', { volume: id, objects: rest.length + 1 });
  }

  private viewOf(meta: VolumeMeta, m: Manifest): VolumeView {
    return {
      id: meta.id,
      created_at: meta.created_at,
      expires_at: meta.expires_at,
      ttl_seconds: meta.ttl_seconds,
      ...usageOf(m),
      generation: m.generation,
      updated_at: m.updated_at,
    };
  }
}

function tooLarge(max: number): HutchError {
  return new HutchError(
    'VOLUME_TOO_LARGE',
    `the volume would hold more than ${max} bytes (HUTCH_VOLUME_MAX_BYTES); it is unchanged`,
  );
}

export function fileView(e: Entry): FileView {
  return {
    path: e.path,
    type: e.type,
    mode: e.mode.toString(8).padStart(4, '0'),
    uid: e.uid,
    gid: e.gid,
    size: e.size,
    mtime: new Date(e.mtime * 1000).toISOString(),
    ...(e.type === 'symlink' ? { target: e.target ?? '' } : {}),
  };
}
