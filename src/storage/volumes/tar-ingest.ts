import tar from 'tar-stream';
import { HutchError } from '../../errors.js';
import type { BlobStore } from './blob-store.js';
import { type Entry, ManifestBuilder, normalizePath } from './manifest.js';
import { SegmentWriter } from './segment-writer.js';
import { newSegmentId } from './volume-ids.js';

export interface IngestLimits {
  /** Sum of the files' sizes. */
  maxBytes: number;
  /** Entries of every kind. */
  maxFiles: number;
}

/** What a save leaves out (counted, reported): devices, FIFOs, other types, names not UTF-8. */
export interface Skipped {
  devices: number;
  fifos: number;
  other: number;
  bad_names: number;
}

export interface IngestResult {
  entries: Entry[];
  /** The new segment's name (null when no file had bytes). */
  seg: string | null;
  bytes: number;
  skipped: Skipped;
}

const refuse = (why: string): HutchError =>
  new HutchError('VOLUME_SAVE_FAILED', `the machine's archive was refused: ${why}; the volume is unchanged`);

/**
 * Parses a tar stream from a guest (untrusted: any bytes at all) into a new version of a
 * volume: file contents go into one new segment, streamed to the store as they arrive, and
 * every entry becomes a manifest entry. Nothing here touches a host path: names are only
 * checked and kept. A name that is absolute or has "..", a hard link to nothing saved, an entry
 * under a non-directory, or a stream that is not tar fails the whole save (VOLUME_SAVE_FAILED);
 * over a limit is VOLUME_TOO_LARGE. Feed it with `write` (waits while the store is behind),
 * then `end`; `abort` on any failure elsewhere.
 */
export class TarIngest {
  private readonly extract = tar.extract();
  private readonly builder = new ManifestBuilder();
  private writer: SegmentWriter | undefined;
  private seg: string | null = null;
  private bytes = 0;
  private readonly skipped: Skipped = { devices: 0, fifos: 0, other: 0, bad_names: 0 };
  private failure: unknown;
  private readonly consumed: Promise<void>;

  constructor(
    private readonly store: BlobStore,
    private readonly segKey: (seg: string) => string,
    private readonly limits: IngestLimits,
  ) {
    this.consumed = this.consume();
    this.consumed.catch((e: unknown) => {
      this.failure ??= e;
      this.extract.destroy();
    });
  }

  private async consume(): Promise<void> {
    for await (const entry of this.extract) {
      const h = entry.header;
      const e = this.entryOf(h);
      if (!e) {
        for await (const _ of entry) {
          // skipped entry: its data (if any) is read and dropped
        }
        continue;
      }
      if (e.type === 'file' && h.type !== 'link' && e.size > 0) {
        this.bytes += e.size;
        if (this.bytes > this.limits.maxBytes)
          throw new HutchError(
            'VOLUME_TOO_LARGE',
            `the machine's /root holds more than ${this.limits.maxBytes} bytes (HUTCH_VOLUME_MAX_BYTES); the volume is unchanged`,
          );
        const w = this.segment();
        e.seg = w.seg;
        e.off = w.writer.offset;
        let got = 0;
        for await (const chunk of entry as AsyncIterable<Buffer>) {
          got += chunk.length;
          await w.writer.write(chunk);
        }
        if (got !== e.size) throw refuse(`${JSON.stringify(e.path)} ended after ${got} of ${e.size} bytes`);
      } else {
        for await (const _ of entry) {
          // directories, symlinks and links carry no data
        }
      }
      const why = this.builder.set(e);
      if (why) throw refuse(why);
      if (this.builder.count > this.limits.maxFiles)
        throw new HutchError(
          'VOLUME_TOO_LARGE',
          `the machine's /root holds more than ${this.limits.maxFiles} entries (HUTCH_VOLUME_MAX_FILES); the volume is unchanged`,
        );
    }
  }

  private segment(): { seg: string; writer: SegmentWriter } {
    if (!this.writer || this.seg === null) {
      this.seg = newSegmentId();
      this.writer = new SegmentWriter(this.store, this.segKey(this.seg));
    }
    return { seg: this.seg, writer: this.writer };
  }

  /** The manifest entry for a tar header, or null for what is not kept (counted in `skipped`). */
  private entryOf(h: tar.Header): Entry | null {
    const raw = h.name;
    if (raw.startsWith('/')) throw refuse(`absolute path ${JSON.stringify(raw)}`);
    const n = normalizePath(raw);
    if ('error' in n) {
      // The root itself ("./"): its attributes are the new machine's own.
      if (raw.split('/').every((c: string) => c === '' || c === '.')) return null;
      throw refuse(`path ${JSON.stringify(raw)} ${n.error}`);
    }
    // Names that are not UTF-8 could not be written back under the same name: left out.
    if (n.path.includes('\uFFFD') || (h.linkname ?? '').includes('\uFFFD')) {
      this.skipped.bad_names++;
      return null;
    }
    const base = {
      path: n.path,
      mode: (h.mode ?? 0o644) & 0o7777,
      uid: h.uid ?? 0,
      gid: h.gid ?? 0,
      mtime: h.mtime ? Math.floor(h.mtime.getTime() / 1000) : 0,
      size: 0,
      seg: null,
      off: 0,
    };
    switch (h.type) {
      case 'file':
      case 'contiguous-file':
      case null:
      case undefined:
        return { ...base, type: 'file', size: h.size ?? 0 };
      case 'directory':
        return { ...base, type: 'dir' };
      case 'symlink': {
        const target = h.linkname ?? '';
        if (target === '' || Buffer.byteLength(target) > 4095)
          throw refuse(`symlink ${JSON.stringify(raw)} target`);
        return { ...base, type: 'symlink', target };
      }
      case 'link': {
        // A hard link: the same bytes as a file already saved (never a path on the host).
        const t = normalizePath(h.linkname ?? '');
        const to = 'path' in t ? this.builder.get(t.path) : undefined;
        if (to?.type !== 'file')
          throw refuse(
            `hard link ${JSON.stringify(raw)} to ${JSON.stringify(h.linkname)}, which is not a saved file`,
          );
        return { ...base, type: 'file', size: to.size, seg: to.seg, off: to.off };
      }
      case 'character-device':
      case 'block-device':
        this.skipped.devices++;
        return null;
      case 'fifo':
        this.skipped.fifos++;
        return null;
      default:
        this.skipped.other++;
        return null;
    }
  }

  /** Feeds bytes of the archive; waits while parsing (and the store) is behind. */
  async write(chunk: Buffer): Promise<void> {
    if (this.failure !== undefined) throw this.mapped(this.failure);
    if (this.extract.write(chunk)) return;
    await new Promise<void>((resolve, reject) => {
      const done = (): void => {
        this.extract.off('drain', done);
        this.extract.off('close', done);
        if (this.failure !== undefined) reject(this.mapped(this.failure));
        else resolve();
      };
      this.extract.on('drain', done);
      this.extract.on('close', done);
      // Whatever failed while we waited is reported by the consumer: re-check when it settles.
      this.consumed.then(done, () => done());
    });
  }

  /** The archive is complete: waits for the last entry and the segment, and returns the version. */
  async end(): Promise<IngestResult> {
    if (this.failure !== undefined) throw this.mapped(this.failure);
    this.extract.end(undefined);
    try {
      await this.consumed;
    } catch (e) {
      throw this.mapped(e);
    }
    if (this.writer) await this.writer.finish();
    return { entries: this.builder.entries(), seg: this.seg, bytes: this.bytes, skipped: this.skipped };
  }

  /** Gives up (the guest failed, the client left): the new segment is discarded. */
  async abort(reason: Error): Promise<void> {
    this.failure ??= reason;
    this.extract.destroy();
    await this.writer?.abort(reason);
  }

  /** Why parsing failed: a HutchError as it is; tar-stream's complaints are a refused archive. */
  mapped(e: unknown): unknown {
    if (e instanceof HutchError) return e;
    return refuse(`not a valid tar stream (${(e as Error).message})`);
  }

  /** The first failure, if any (mapped). */
  get failed(): unknown {
    return this.failure === undefined ? undefined : this.mapped(this.failure);
  }
}
