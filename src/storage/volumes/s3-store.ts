import { PassThrough, type Readable, Transform } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { HutchError } from '../../errors.js';
import {
  type BlobInfo,
  type BlobListing,
  BlobNotFound,
  type BlobStore,
  defaultSmallMaxBytes,
} from './blob-store.js';

export interface S3Options {
  endpoint?: string | undefined;
  bucket: string;
  region: string;
  accessKeyId?: string | undefined;
  secretAccessKey?: string | undefined;
  forcePathStyle: boolean;
  /** Prepended to every key (e.g. "hutch/"; the volume code adds "volumes/"). */
  prefix: string;
  /** Attempts per request, the first included (the SDK's standard retry: 5xx, throttling, resets). */
  maxAttempts: number;
  /** Multipart part size, bytes (S3's minimum is 5 MiB). */
  partBytes: number;
  /** A request with no answer for this long fails (and is retried). */
  timeoutMs: number;
}

/** Parts of one upload in flight at once: memory per upload is about this many parts. */
const queueSize = 2;

/**
 * Objects in an S3 bucket (AWS or any compatible server). Streams go up as multipart uploads
 * (`@aws-sdk/lib-storage`: parts of `partBytes`, two in flight, so memory per upload is bounded
 * whatever its size; a body smaller than one part is a single PUT). S3 makes an object visible
 * only once its upload completes, and a failed upload is aborted, so readers never see half an
 * object. The SDK retries what is retryable (5xx, throttling, connection resets) up to
 * `maxAttempts`; what still fails is STORAGE_UNAVAILABLE.
 */
export class S3Store implements BlobStore {
  readonly description: string;
  readonly shared = true;
  private readonly client: S3Client;

  constructor(private readonly o: S3Options) {
    this.description = `s3 ${o.endpoint ?? 'aws'}/${o.bucket}/${o.prefix}`;
    this.client = new S3Client({
      ...(o.endpoint ? { endpoint: o.endpoint } : {}),
      region: o.region,
      forcePathStyle: o.forcePathStyle,
      maxAttempts: o.maxAttempts,
      ...(o.accessKeyId && o.secretAccessKey
        ? { credentials: { accessKeyId: o.accessKeyId, secretAccessKey: o.secretAccessKey } }
        : {}),
      requestHandler: { connectionTimeout: Math.min(o.timeoutMs, 10_000), requestTimeout: o.timeoutMs },
    });
  }

  private k(key: string): string {
    return `${this.o.prefix}${key}`;
  }

  async put(key: string, body: Readable, opts: { size?: number } = {}): Promise<{ bytes: number }> {
    let bytes = 0;
    const counted = body.pipe(
      new Transform({
        transform(chunk: Buffer, _enc, cb) {
          bytes += chunk.length;
          cb(null, chunk);
        },
      }),
    );
    body.once('error', (e) => counted.destroy(e));
    const upload = new Upload({
      client: this.client,
      params: { Bucket: this.o.bucket, Key: this.k(key), Body: counted },
      partSize: this.o.partBytes,
      queueSize,
      leavePartsOnError: false,
    });
    try {
      await upload.done();
    } catch (e) {
      // A limit the body's owner hit says more than the upload's failure; anything else the
      // upload saw (it also aborts the body itself) is the store's.
      const own = body.errored ?? counted.errored;
      body.destroy();
      throw own instanceof HutchError ? own : s3Error(e, `writing ${key}`);
    }
    if (opts.size !== undefined && bytes !== opts.size) {
      await this.delete([key]).catch(() => {});
      throw new HutchError('INVALID_ARGUMENT', `expected ${opts.size} bytes for ${key}, got ${bytes}`);
    }
    return { bytes };
  }

  async get(key: string, range: { start?: number; end?: number } = {}): Promise<Readable> {
    const r =
      range.start !== undefined || range.end !== undefined
        ? `bytes=${range.start ?? 0}-${range.end ?? ''}`
        : undefined;
    try {
      const res = await this.client.send(
        new GetObjectCommand({ Bucket: this.o.bucket, Key: this.k(key), ...(r ? { Range: r } : {}) }),
      );
      // The SDK's body is the HTTP response itself; a pass-through gives callers a plain stream
      // whose mid-transfer failure is STORAGE_UNAVAILABLE like any other.
      const src = res.Body as Readable;
      const out = new PassThrough({ highWaterMark: 256 * 1024 });
      src.on('error', (e) => out.destroy(s3Error(e, `reading ${key}`) as Error));
      out.on('close', () => src.destroy());
      src.pipe(out);
      return out;
    } catch (e) {
      throw s3Error(e, `reading ${key}`);
    }
  }

  async head(key: string): Promise<BlobInfo> {
    try {
      const h = await this.client.send(new HeadObjectCommand({ Bucket: this.o.bucket, Key: this.k(key) }));
      return { key, size: h.ContentLength ?? 0, mtime: h.LastModified ?? new Date(0) };
    } catch (e) {
      throw s3Error(e, `reading ${key}`);
    }
  }

  async delete(keys: string[]): Promise<void> {
    for (let i = 0; i < keys.length; i += 1000) {
      const batch = keys.slice(i, i + 1000);
      try {
        const r = await this.client.send(
          new DeleteObjectsCommand({
            Bucket: this.o.bucket,
            Delete: { Objects: batch.map((k) => ({ Key: this.k(k) })), Quiet: true },
          }),
        );
        const failed = (r.Errors ?? []).filter((x) => x.Code !== 'NoSuchKey');
        if (failed.length)
          throw new HutchError(
            'STORAGE_UNAVAILABLE',
            `the store refused to remove ${failed.length} objects (${failed[0]?.Code}: ${failed[0]?.Message})`,
          );
      } catch (e) {
        throw s3Error(e, 'removing objects');
      }
    }
  }

  async list(prefix: string, opts: { delimiter?: string } = {}): Promise<BlobListing> {
    const out: BlobListing = { objects: [], prefixes: [] };
    let token: string | undefined;
    const strip = this.o.prefix.length;
    try {
      do {
        const r = await this.client.send(
          new ListObjectsV2Command({
            Bucket: this.o.bucket,
            Prefix: this.k(prefix),
            ...(opts.delimiter ? { Delimiter: opts.delimiter } : {}),
            ...(token ? { ContinuationToken: token } : {}),
          }),
        );
        for (const o of r.Contents ?? [])
          if (o.Key)
            out.objects.push({
              key: o.Key.slice(strip),
              size: o.Size ?? 0,
              mtime: o.LastModified ?? new Date(0),
            });
        for (const p of r.CommonPrefixes ?? []) if (p.Prefix) out.prefixes.push(p.Prefix.slice(strip));
        token = r.IsTruncated ? r.NextContinuationToken : undefined;
      } while (token);
    } catch (e) {
      throw s3Error(e, `listing ${prefix}`);
    }
    return out;
  }

  async putSmall(key: string, data: Buffer): Promise<void> {
    try {
      await this.client.send(
        new PutObjectCommand({
          Bucket: this.o.bucket,
          Key: this.k(key),
          Body: data,
          ContentLength: data.length,
        }),
      );
    } catch (e) {
      throw s3Error(e, `writing ${key}`);
    }
  }

  async getSmall(key: string, maxBytes = defaultSmallMaxBytes): Promise<Buffer> {
    // The SDK retries a request until its answer's headers; a body cut off after them (a reset
    // mid-transfer) is retried here, the whole GET again: these objects are small.
    for (let attempt = 1; ; attempt++) {
      let body: { transformToByteArray(): Promise<Uint8Array> };
      try {
        const res = await this.client.send(new GetObjectCommand({ Bucket: this.o.bucket, Key: this.k(key) }));
        if ((res.ContentLength ?? 0) > maxBytes) {
          (res.Body as Readable).destroy();
          throw new HutchError(
            'STORAGE_UNAVAILABLE',
            `${key} is ${res.ContentLength} bytes, over ${maxBytes}: not read`,
          );
        }
        body = res.Body as typeof body;
      } catch (e) {
        throw s3Error(e, `reading ${key}`);
      }
      try {
        return Buffer.from(await body.transformToByteArray());
      } catch (e) {
        if (attempt >= this.o.maxAttempts) throw s3Error(e, `reading ${key}`);
        await new Promise((r) => setTimeout(r, 50 * attempt));
      }
    }
  }

  /** Aborts multipart uploads started before `olderThan` (a daemon killed mid-upload leaves them). */
  async collectLeftovers(prefix: string, olderThan: Date): Promise<number> {
    let n = 0;
    try {
      const r = await this.client.send(
        new ListMultipartUploadsCommand({ Bucket: this.o.bucket, Prefix: this.k(prefix) }),
      );
      for (const u of r.Uploads ?? []) {
        if (!u.Key || !u.UploadId || (u.Initiated && u.Initiated > olderThan)) continue;
        await this.client.send(
          new AbortMultipartUploadCommand({ Bucket: this.o.bucket, Key: u.Key, UploadId: u.UploadId }),
        );
        n++;
      }
    } catch (e) {
      // Servers without ListMultipartUploads (some S3 look-alikes) have nothing to collect here.
      const status = (e as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
      if (status === 501 || status === 404 || status === 405 || status === 400) return n;
      throw s3Error(e, 'listing multipart uploads');
    }
    return n;
  }
}

/** An S3 failure as the volume code sees it: a missing key, or the store being unavailable. */
export function s3Error(e: unknown, what: string): unknown {
  if (e instanceof HutchError || e instanceof BlobNotFound) return e;
  const err = e as {
    name?: string;
    code?: string;
    message?: string;
    $metadata?: { httpStatusCode?: number };
  };
  const status = err.$metadata?.httpStatusCode;
  if (err.name !== 'NoSuchBucket' && (err.name === 'NoSuchKey' || err.name === 'NotFound' || status === 404))
    return new BlobNotFound(what.replace(/^\w+ /, ''));
  const why = `${err.name ?? 'Error'}${status ? ` (HTTP ${status})` : ''}${err.code ? ` ${err.code}` : ''}: ${err.message ?? String(e)}`;
  return new HutchError('STORAGE_UNAVAILABLE', `the volume store failed ${what}: ${why}`);
}
