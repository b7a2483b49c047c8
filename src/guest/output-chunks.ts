/** Chunks smaller than this are copied into shared blocks rather than kept as they came. */
const smallChunk = 4096;
const blockSize = 64 * 1024;

/**
 * Bytes kept in arrival order, costing about their size. A chunk as it comes from a socket or
 * an agent stream may be a view into a much larger buffer (an output stream hands out 16 KiB
 * blocks for a few bytes of output): kept as is, a guest printing a byte at a time would make
 * a byte cost kilobytes. Small chunks are copied into blocks; big ones are copied only when
 * they are a small view of a big buffer.
 */
export class OutputChunks {
  private readonly parts: Buffer[] = [];
  private block: Buffer | undefined;
  private blockUsed = 0;
  private size = 0;

  get bytes(): number {
    return this.size;
  }

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.size += b.length;
    if (b.length >= smallChunk) {
      this.seal();
      this.parts.push(b.buffer.byteLength > 2 * b.length ? Buffer.from(b) : b);
      return;
    }
    if (!this.block || this.blockUsed + b.length > this.block.length) {
      this.seal();
      this.block = Buffer.allocUnsafe(blockSize);
    }
    b.copy(this.block, this.blockUsed);
    this.blockUsed += b.length;
  }

  /** The chunks so far (the partly filled last block as a view of what it holds). */
  chunks(): Buffer[] {
    this.seal();
    return this.parts;
  }

  /** Everything as one Buffer (a copy: for small outputs). */
  concat(): Buffer {
    return Buffer.concat(this.chunks(), this.size);
  }

  private seal(): void {
    if (this.block && this.blockUsed > 0) this.parts.push(this.block.subarray(0, this.blockUsed));
    this.block = undefined;
    this.blockUsed = 0;
  }
}
