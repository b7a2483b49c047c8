import { isUtf8 } from 'node:buffer';
import type { Writable } from 'node:stream';

/**
 * Encoding of streamed command output as NDJSON (one JSON object per line), shared by every
 * surface that streams an exec:
 *
 *   {"type":"stdout","data":"text"}                      output that is valid UTF-8
 *   {"type":"stderr","data":"/w==","encoding":"base64"}  output that is not: the bytes, base64
 *   {"type":"exit","exit_code":0,"signal":null,"timed_out":false,"duration_ms":12}
 *   {"type":"error","code":"AGENT_UNAVAILABLE","message":"…"}   the stream broke; no exit follows
 *
 * A UTF-8 sequence is never split across two lines: an incomplete sequence at the end of a chunk
 * is held back until the next chunk of the same stream (or its end) completes it. Decoding each
 * line's `data` (text → UTF-8 bytes, base64 → bytes) and concatenating gives the exact bytes.
 */
export type OutputStream = 'stdout' | 'stderr';

export type ExecStreamEvent =
  | { type: OutputStream; data: string; encoding?: 'base64' }
  | { type: 'exit'; exit_code: number | null; signal: number | null; timed_out: boolean; duration_ms: number }
  | { type: 'error'; code: string; message: string };

/** How many bytes at the end of `b` begin a UTF-8 sequence that `b` does not complete. */
export function incompleteUtf8Tail(b: Buffer): number {
  // A sequence is at most 4 bytes: look at the last 3 for the lead byte of an unfinished one.
  for (let back = 1; back <= Math.min(3, b.length); back++) {
    const byte = b[b.length - back] ?? 0;
    if ((byte & 0xc0) === 0x80) continue; // continuation byte: keep looking for the lead
    let need = 1; // ASCII, or a byte that starts no valid sequence
    if (byte >= 0xc2 && byte <= 0xdf) need = 2;
    else if (byte >= 0xe0 && byte <= 0xef) need = 3;
    else if (byte >= 0xf0 && byte <= 0xf4) need = 4;
    return need > back ? back : 0;
  }
  return 0;
}

/** Turns one output stream's chunks into events, holding back split UTF-8 sequences. */
export class OutputEncoder {
  private carry: Buffer = Buffer.alloc(0);

  constructor(private readonly stream: OutputStream) {}

  /** The event for a chunk (undefined when everything was held back). */
  push(chunk: Buffer): ExecStreamEvent | undefined {
    const all = this.carry.length ? Buffer.concat([this.carry, chunk]) : chunk;
    const hold = incompleteUtf8Tail(all);
    this.carry = hold ? Buffer.from(all.subarray(all.length - hold)) : Buffer.alloc(0);
    return this.event(all.subarray(0, all.length - hold));
  }

  /** The event for what was held back, at the end of the stream. */
  flush(): ExecStreamEvent | undefined {
    const rest = this.carry;
    this.carry = Buffer.alloc(0);
    return this.event(rest);
  }

  private event(b: Buffer): ExecStreamEvent | undefined {
    if (b.length === 0) return undefined;
    if (isUtf8(b)) return { type: this.stream, data: b.toString('utf8') };
    return { type: this.stream, data: b.toString('base64'), encoding: 'base64' };
  }
}

/** One NDJSON line. */
export function encodeEvent(e: ExecStreamEvent): string {
  return `${JSON.stringify(e)}\n`;
}

/**
 * Writes to a response and, when it reports a full buffer (write → false), waits for 'drain'.
 * Rejects if the destination closes first, so a producer stops when the client goes away.
 * `stalls` counts the waits (how often the client was the bottleneck).
 */
export async function writeRespectingBackpressure(
  dest: Writable,
  data: Buffer | string,
  stats?: { stalls: number },
): Promise<void> {
  if (dest.destroyed) throw new Error('the client went away');
  if (dest.write(data)) return;
  if (stats) stats.stalls++;
  await new Promise<void>((resolve, reject) => {
    const done = (err?: Error): void => {
      dest.off('drain', onDrain);
      dest.off('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = (): void => done();
    const onClose = (): void => done(new Error('the client went away'));
    dest.on('drain', onDrain);
    dest.on('close', onClose);
  });
}
