import type { Writable } from 'node:stream';
import { Utf8Chunker } from '../engine/exec-log.js';

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

export { incompleteUtf8Tail } from '../engine/exec-log.js';

/** Turns one output stream's chunks into events, holding back split UTF-8 sequences. */
export class OutputEncoder {
  private readonly chunker = new Utf8Chunker();

  constructor(private readonly stream: OutputStream) {}

  /** The event for a chunk (undefined when everything was held back). */
  push(chunk: Buffer): ExecStreamEvent | undefined {
    const c = this.chunker.push(chunk);
    return c && { type: this.stream, ...c };
  }

  /** The event for what was held back, at the end of the stream. */
  flush(): ExecStreamEvent | undefined {
    const c = this.chunker.flush();
    return c && { type: this.stream, ...c };
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
  /** A reader that takes nothing for this long fails the write (default: wait for ever). */
  stallTimeoutMs?: number,
): Promise<void> {
  if (dest.destroyed) throw new Error('the client went away');
  if (dest.write(data)) return;
  if (stats) stats.stalls++;
  await new Promise<void>((resolve, reject) => {
    const timer =
      stallTimeoutMs === undefined
        ? undefined
        : setTimeout(() => done(new StalledReaderError(stallTimeoutMs)), stallTimeoutMs);
    const done = (err?: Error): void => {
      clearTimeout(timer);
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

/** The reader took nothing for the allowed time (it is cut off: the client's doing, not a bug). */
export class StalledReaderError extends Error {
  constructor(ms: number) {
    super(`the client read nothing for ${ms} ms`);
    this.name = 'StalledReaderError';
  }
}
