import type { Readable } from 'node:stream';

/**
 * Where volumes live: a flat key → bytes store with S3's semantics, so the same volume code
 * runs on a local directory (local-store.ts) and on any S3-compatible service (s3-store.ts).
 *
 * What the volume code relies on, and every backend gives:
 * - an object appears whole or not at all (`put` of a stream that fails leaves nothing, and a
 *   reader never sees half an object), and a `put` over an existing key replaces it atomically;
 * - ranged reads (`get` with start/end, end inclusive, as HTTP ranges);
 * - listing by prefix, with a delimiter giving the next level's "folders";
 * - `mtime` on every object, which the collector compares with its grace period.
 *
 * Failures are HutchErrors of the one table: STORAGE_FULL (local disk), STORAGE_UNAVAILABLE
 * (S3 unreachable or failing after its retries); a missing key is BlobNotFound, which the
 * volume code turns into the answer that fits (VOLUME_NOT_FOUND, FILE_NOT_FOUND, …).
 */
export interface BlobStore {
  /** What the store is, for logs and GET /healthz-like reports ("local /var/lib/hutch/volumes"). */
  readonly description: string;
  /**
   * Whether other hosts may use the same objects (S3): then nothing is removed before the
   * collector's grace period, since another host may be reading a version just replaced.
   */
  readonly shared: boolean;
  /**
   * Streams `body` into `key`. Resolves once the object is durable; on any failure (the body
   * errored, the disk filled, S3 went away) nothing is left under `key` (a previous object
   * there is unchanged) and the promise rejects.
   */
  put(key: string, body: Readable, opts?: { size?: number }): Promise<{ bytes: number }>;
  /** The object's bytes, from `start` to `end` inclusive (defaults: the whole object). */
  get(key: string, range?: { start?: number; end?: number }): Promise<Readable>;
  head(key: string): Promise<BlobInfo>;
  /** Removes keys; absent ones are no error. */
  delete(keys: string[]): Promise<void>;
  /**
   * Objects whose key starts with `prefix`. With `delimiter` ('/'), keys with another delimiter
   * after the prefix are grouped into `prefixes` (S3's CommonPrefixes) instead.
   */
  list(prefix: string, opts?: { delimiter?: string }): Promise<BlobListing>;
  /** A small object in one piece (metadata); atomic like put. */
  putSmall(key: string, data: Buffer): Promise<void>;
  /** A small object read whole; at most `maxBytes` (a larger one is refused, not read). */
  getSmall(key: string, maxBytes?: number): Promise<Buffer>;
  /** Work the store does in the background (S3: abandoned multipart uploads), for the collector. */
  collectLeftovers?(prefix: string, olderThan: Date): Promise<number>;
}

export interface BlobInfo {
  key: string;
  size: number;
  mtime: Date;
}

export interface BlobListing {
  objects: BlobInfo[];
  prefixes: string[];
}

/** A key that is not there (the volume code says what was missing). */
export class BlobNotFound extends Error {
  constructor(readonly key: string) {
    super(`no object ${key}`);
    this.name = 'BlobNotFound';
  }
}

export function isBlobNotFound(e: unknown): e is BlobNotFound {
  return e instanceof BlobNotFound;
}

/** Metadata objects are read whole: larger than this is a broken or hostile store. */
export const defaultSmallMaxBytes = 512 * 1024 * 1024;
