import type { Readable } from 'node:stream';
import type { BlobStore } from './blob-store.js';

/**
 * Reads file contents out of segments for a restore. Files saved together sit back to back in
 * their segment, in the order the manifest lists them, so one ranged read serves a whole run
 * of files: a new read is opened only when the next file is elsewhere (another segment, or a
 * gap), which keeps a restore of thousands of small files to a handful of requests on S3.
 */
export class SegmentReader {
  private seg: string | null = null;
  private pos = 0;
  private it: AsyncIterator<Buffer> | undefined;
  private stream: Readable | undefined;
  private left: Buffer | undefined;

  constructor(
    private readonly store: BlobStore,
    private readonly segKey: (seg: string) => string,
  ) {}

  /** The `size` bytes at `off` of `seg`, in chunks. */
  async *read(seg: string, off: number, size: number): AsyncGenerator<Buffer> {
    if (size === 0) return;
    if (this.seg !== seg || this.pos !== off || !this.it) await this.open(seg, off);
    let need = size;
    while (need > 0) {
      let b = this.left;
      this.left = undefined;
      if (!b) {
        const r = await (this.it as AsyncIterator<Buffer>).next();
        if (r.done) throw new Error(`segment ${seg} ended ${need} bytes early`);
        b = r.value;
      }
      if (b.length > need) {
        this.left = b.subarray(need);
        b = b.subarray(0, need);
      }
      need -= b.length;
      this.pos += b.length;
      yield b;
    }
  }

  private async open(seg: string, off: number): Promise<void> {
    this.close();
    this.stream = await this.store.get(this.segKey(seg), { start: off });
    this.it = (this.stream as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
    this.seg = seg;
    this.pos = off;
  }

  close(): void {
    this.stream?.destroy();
    this.stream = undefined;
    this.it = undefined;
    this.left = undefined;
    this.seg = null;
  }
}
