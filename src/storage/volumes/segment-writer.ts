import { PassThrough } from 'node:stream';
import type { BlobStore } from './blob-store.js';

/**
 * One new segment being written: file contents back to back, streamed to the store as they
 * come (a multipart upload on S3), so a save or an upload of any size holds only a few buffers.
 * `offset` is where the next file's bytes start. The object appears only when `finish`
 * succeeds; `abort` (or any failure) leaves nothing but what the collector removes.
 */
export class SegmentWriter {
  private readonly body = new PassThrough({ highWaterMark: 1024 * 1024 });
  private readonly done: Promise<{ bytes: number }>;
  private failure: unknown;
  offset = 0;

  constructor(
    store: BlobStore,
    readonly key: string,
  ) {
    // A failure is reported through `done` (the store's put rejects with it), whether or not the
    // store has started reading yet.
    this.body.on('error', () => {});
    this.done = store.put(key, this.body);
    this.done.catch((e: unknown) => {
      this.failure ??= e;
      this.body.destroy();
    });
  }

  /** Appends bytes; waits while the store is behind. Rejects once the store has failed. */
  async write(chunk: Buffer): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    // The store may have destroyed the body before its failure reached `done`'s handler: its
    // 'close' is then already past, and waiting for it would wait for ever.
    if (this.body.destroyed) throw await this.failed();
    this.offset += chunk.length;
    if (this.body.write(chunk)) return;
    if (this.body.destroyed) throw await this.failed();
    await new Promise<void>((resolve, reject) => {
      const cleanup = (): void => {
        this.body.off('drain', onDrain);
        this.body.off('close', onClose);
      };
      const onDrain = (): void => {
        cleanup();
        resolve();
      };
      const onClose = (): void => {
        cleanup();
        // The store failed (the reason arrives with `done`'s rejection): wait for it.
        this.done.then(
          () => reject(new Error('segment closed')),
          (e: unknown) => reject(e),
        );
      };
      this.body.on('drain', onDrain);
      this.body.on('close', onClose);
    });
  }

  /** Why the store stopped taking bytes (its put's rejection). */
  private async failed(): Promise<unknown> {
    try {
      await this.done;
      return new Error('the segment was closed');
    } catch (e) {
      return this.failure ?? e;
    }
  }

  /** Ends the segment; resolves once it is stored whole. */
  async finish(): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    this.body.end();
    await this.done;
  }

  /** Gives up: the store's write fails with `reason` and leaves no object. */
  async abort(reason: Error): Promise<void> {
    this.failure ??= reason;
    this.body.destroy(reason);
    await this.done.catch(() => {});
  }
}
