import type { ByteAllowance } from '../guest/agent-connection.js';
import type { OutputChunks } from '../guest/output-chunks.js';
import { incompleteUtf8Tail } from './exec-log.js';

/**
 * The bytes of output that buffered execs (POST /exec, POST /v1/run) may hold at once, all of
 * them together: each keeps its output until its reply is written, so without a shared bound
 * a few concurrent calls could hold any multiple of the per-exec cap. What the budget does not
 * grant is dropped and the exec's reply says `truncated`.
 */
export class OutputBudget implements ByteAllowance {
  private used = 0;

  constructor(readonly limit: number) {}

  get inUse(): number {
    return this.used;
  }

  take(n: number): number {
    const granted = Math.max(0, Math.min(n, this.limit - this.used));
    this.used += granted;
    return granted;
  }

  release(n: number): void {
    this.used = Math.max(0, this.used - n);
  }
}

/** Bytes of UTF-8 decoded into one piece of a reply. */
const sliceBytes = 64 * 1024;

/** A reply that was dropped without being written still gives its bytes back, when collected. */
const unreleased = new FinalizationRegistry<{ budget: ByteAllowance; bytes: number }>(({ budget, bytes }) =>
  budget.release(bytes),
);

/**
 * One output stream of a buffered exec, held for its JSON reply: the bytes as they came (no
 * copy into one buffer, no one big string) and the share of the budget they hold until
 * `release`. In a reply it is the bytes decoded as UTF-8 (invalid sequences become U+FFFD, as
 * they always have); `jsonPieces` gives that JSON string a slice at a time, so writing it costs
 * a slice of memory, not the whole decoded and escaped text.
 */
export class HeldText {
  /** The bytes held (0 once released). */
  bytes: number;
  private parts: Buffer[];
  private readonly token = {};

  constructor(
    output?: OutputChunks,
    private readonly budget?: ByteAllowance,
  ) {
    this.parts = output?.chunks() ?? [];
    const bytes = output?.bytes ?? 0;
    if (budget && bytes > 0) unreleased.register(this, { budget, bytes }, this.token);
    this.bytes = bytes;
  }

  /**
   * The JSON string literal, quotes included, in pieces that together equal
   * `JSON.stringify(text)`: each slice is cut where no UTF-8 sequence spans the cut, so
   * decoding slice by slice gives the same characters as decoding the whole.
   */
  *jsonPieces(): Generator<string> {
    yield '"';
    let carry: Buffer | undefined;
    for (const part of this.parts) {
      for (let off = 0; off < part.length; off += sliceBytes) {
        const raw = part.subarray(off, off + sliceBytes);
        const slice = carry ? Buffer.concat([carry, raw]) : raw;
        const cut = slice.length - incompleteUtf8Tail(slice);
        carry = cut < slice.length ? Buffer.from(slice.subarray(cut)) : undefined;
        if (cut > 0) yield escaped(slice.toString('utf8', 0, cut));
      }
    }
    if (carry) yield escaped(carry.toString('utf8'));
    yield '"';
  }

  /** The whole text (what JSON.stringify uses; the HTTP replies write `jsonPieces` instead). */
  toJSON(): string {
    return Buffer.concat(this.parts).toString('utf8');
  }

  /** Drops the bytes and gives their share back (once; later calls do nothing). */
  release(): void {
    if (this.budget && this.bytes > 0) {
      unreleased.unregister(this.token);
      this.budget.release(this.bytes);
    }
    this.parts = [];
    this.bytes = 0;
  }
}

/** A string's JSON escape without the quotes. */
function escaped(s: string): string {
  return JSON.stringify(s).slice(1, -1);
}
