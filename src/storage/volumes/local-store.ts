import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rmdir, stat, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { HutchError, isDiskFull } from '../../errors.js';
import {
  type BlobInfo,
  type BlobListing,
  BlobNotFound,
  type BlobStore,
  defaultSmallMaxBytes,
} from './blob-store.js';

/** Temporary names objects are written under before their rename (collected like any garbage). */
const tmpPrefix = '.tmp-';

/**
 * Objects as files under one directory (`<state dir>/volumes` by default): key `a/b` is the
 * file `<dir>/a/b`. Every object is written to a temporary name beside it, fsynced, renamed
 * over the key and the directory fsynced, so a crash (or a full disk) shows either the old
 * object or the new one, never half of one; the temporary file of an interrupted write is left
 * for the collector (it is not referenced by anything). A full disk is STORAGE_FULL.
 */
export class LocalStore implements BlobStore {
  readonly description: string;
  readonly shared = false;

  constructor(private readonly dir: string) {
    this.description = `local ${dir}`;
  }

  /** Keys are made by the volume code only, but a key never leaves the directory whatever it is. */
  private pathOf(key: string): string {
    if (key === '' || key.startsWith('/') || key.includes('\0') || key.split('/').some((c) => c === '..'))
      throw new HutchError('INTERNAL', `bad object key ${JSON.stringify(key)}`);
    return join(this.dir, key);
  }

  async put(key: string, body: Readable, opts: { size?: number } = {}): Promise<{ bytes: number }> {
    const path = this.pathOf(key);
    const dir = dirname(path);
    const tmp = join(dir, `${tmpPrefix}${randomBytes(8).toString('hex')}`);
    let bytes = 0;
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      const fh = await open(tmp, 'wx', 0o600);
      try {
        // One write per chunk, awaited: the body is read only as fast as the disk takes it.
        for await (const chunk of body as AsyncIterable<Buffer>) {
          await fh.write(chunk);
          bytes += chunk.length;
        }
        if (opts.size !== undefined && bytes !== opts.size)
          throw new HutchError('INVALID_ARGUMENT', `expected ${opts.size} bytes for ${key}, got ${bytes}`);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, path);
      await syncDir(dir);
      return { bytes };
    } catch (e) {
      body.destroy();
      await unlink(tmp).catch(() => {});
      throw storageError(e, `writing ${key}`);
    }
  }

  async get(key: string, range: { start?: number; end?: number } = {}): Promise<Readable> {
    const path = this.pathOf(key);
    await this.head(key);
    return createReadStream(path, {
      ...(range.start !== undefined ? { start: range.start } : {}),
      ...(range.end !== undefined ? { end: range.end } : {}),
      highWaterMark: 256 * 1024,
    });
  }

  async head(key: string): Promise<BlobInfo> {
    try {
      const s = await stat(this.pathOf(key));
      if (!s.isFile()) throw new BlobNotFound(key);
      return { key, size: s.size, mtime: s.mtime };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' || (e as NodeJS.ErrnoException).code === 'ENOTDIR')
        throw new BlobNotFound(key);
      throw storageError(e, `reading ${key}`);
    }
  }

  async delete(keys: string[]): Promise<void> {
    const dirs = new Set<string>();
    for (const key of keys) {
      const path = this.pathOf(key);
      try {
        await unlink(path);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw storageError(e, `removing ${key}`);
      }
      dirs.add(dirname(path));
    }
    // Folders left empty go too (S3 has none); one that is not empty (or is used again
    // meanwhile) stays, and a put recreates what it needs.
    for (const d of [...dirs].sort((a, b) => b.length - a.length))
      for (let x = d; x.startsWith(`${this.dir}/`); x = dirname(x))
        if (
          !(await rmdir(x).then(
            () => true,
            () => false,
          ))
        )
          break;
  }

  async list(prefix: string, opts: { delimiter?: string } = {}): Promise<BlobListing> {
    const slash = prefix.lastIndexOf('/');
    const dirKey = prefix.slice(0, slash + 1);
    const namePrefix = prefix.slice(slash + 1);
    const out: BlobListing = { objects: [], prefixes: [] };
    const walk = async (key: string, filter: string): Promise<void> => {
      let names: string[];
      try {
        names = await readdir(key === '' ? this.dir : this.pathOf(key.slice(0, -1)));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT' || (e as NodeJS.ErrnoException).code === 'ENOTDIR')
          return;
        throw storageError(e, `listing ${key}`);
      }
      for (const name of names.sort()) {
        if (!name.startsWith(filter)) continue;
        const k = `${key}${name}`;
        let s: Awaited<ReturnType<typeof stat>>;
        try {
          s = await stat(this.pathOf(k));
        } catch {
          continue; // removed meanwhile
        }
        if (s.isDirectory()) {
          if (opts.delimiter === '/') out.prefixes.push(`${k}/`);
          else await walk(`${k}/`, '');
        } else if (s.isFile()) out.objects.push({ key: k, size: s.size, mtime: s.mtime });
      }
    };
    await walk(dirKey, namePrefix);
    return out;
  }

  async putSmall(key: string, data: Buffer): Promise<void> {
    await this.put(key, Readable.from([data]), { size: data.length });
  }

  async getSmall(key: string, maxBytes = defaultSmallMaxBytes): Promise<Buffer> {
    const info = await this.head(key);
    if (info.size > maxBytes)
      throw new HutchError('STORAGE_UNAVAILABLE', `${key} is ${info.size} bytes, over ${maxBytes}: not read`);
    try {
      return await readFile(this.pathOf(key));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new BlobNotFound(key);
      throw storageError(e, `reading ${key}`);
    }
  }
}

async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** A local failure: STORAGE_FULL for a full disk, else as it is (a HutchError, or the body's own error). */
function storageError(e: unknown, what: string): unknown {
  if (e instanceof HutchError || e instanceof BlobNotFound) return e;
  if (isDiskFull(e)) return new HutchError('STORAGE_FULL', `the volume store's disk is full (${what})`);
  return e;
}
