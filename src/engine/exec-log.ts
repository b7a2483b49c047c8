import { isUtf8 } from 'node:buffer';
import { EventEmitter } from 'node:events';
import { appendFileSync, closeSync, openSync, readFileSync, truncateSync, writeSync } from 'node:fs';
import { type FileHandle, open } from 'node:fs/promises';

/**
 * One event of an exec's output, as the SSE stream carries it. `data` is text when the bytes
 * are valid UTF-8, else base64 with `encoding: "base64"` (so binary output round-trips exactly).
 */
export interface ExecEvent {
  event: 'log' | 'exit';
  stream: 'stdout' | 'stderr' | null;
  data: string;
  seq: number;
  encoding?: 'base64';
}

/**
 * Splits a byte stream into events without cutting a UTF-8 sequence in two: an incomplete
 * sequence at the end of a chunk waits for the next chunk (or for the end of the stream).
 */
export class Utf8Chunker {
  private carry: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): { data: string; encoding?: 'base64' } | undefined {
    const buf = this.carry.length ? Buffer.concat([this.carry, chunk]) : chunk;
    const cut = buf.length - incompleteUtf8Tail(buf);
    this.carry = Buffer.from(buf.subarray(cut));
    return cut === 0 ? undefined : encode(buf.subarray(0, cut));
  }

  flush(): { data: string; encoding?: 'base64' } | undefined {
    const rest = this.carry;
    this.carry = Buffer.alloc(0);
    return rest.length ? encode(rest) : undefined;
  }
}

function encode(b: Buffer): { data: string; encoding?: 'base64' } {
  return isUtf8(b) ? { data: b.toString('utf8') } : { data: b.toString('base64'), encoding: 'base64' };
}

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

/**
 * Bytes a group of logs may hold together (all of one box's, all of every box's): what a guest
 * can make the host store is bounded per box and in total, not only per exec.
 */
export class ByteBudget {
  constructor(
    readonly max: number,
    public used = 0,
  ) {}

  fits(n: number): boolean {
    return this.used + n <= this.max;
  }

  give(n: number): void {
    this.used = Math.max(0, this.used - n);
  }
}

/**
 * The event log of one exec: every event appended to a file (NDJSON) as it happens, and told to
 * live readers. The file is what makes replay complete: a reader that connects at any time,
 * or reconnects, gets every event from seq 1, in order, then the live ones.
 */
export class ExecLog extends EventEmitter {
  private fd: number | undefined;
  private seq = 0;
  private bytes = 0;
  private finished = false;
  /** Output stopped being recorded: the cap was reached, or the host disk refused a write. */
  truncated = false;

  constructor(
    readonly path: string,
    /** A guest can print forever; its log may not fill the host's disk. */
    private readonly maxBytes = Number.POSITIVE_INFINITY,
    /** Budgets shared with other logs (the box's, everyone's): output stops when one is spent. */
    private readonly budgets: ByteBudget[] = [],
  ) {
    super();
    this.fd = openSync(path, 'a', 0o600);
  }

  get done(): boolean {
    return this.finished;
  }

  /**
   * Records an event and tells live readers. Output past the cap (or after a failed write) is
   * dropped for file and live readers alike, so a replay always equals what was seen live; the
   * exit event is always attempted.
   */
  append(ev: Omit<ExecEvent, 'seq'>): ExecEvent | undefined {
    if (this.finished) throw new Error('exec log is closed');
    if (ev.event === 'log' && this.truncated) return undefined;
    const full: ExecEvent = { ...ev, seq: this.seq + 1 };
    const line = `${JSON.stringify(full)}\n`;
    if (
      ev.event === 'log' &&
      (this.bytes + line.length > this.maxBytes || !this.budgets.every((b) => b.fits(line.length)))
    ) {
      this.truncated = true;
      return undefined;
    }
    try {
      if (this.fd !== undefined) writeSync(this.fd, line);
    } catch {
      // ENOSPC and friends: the daemon carries on; this exec's output is cut here.
      this.truncated = true;
      if (ev.event === 'log') return undefined;
    }
    this.seq++;
    this.bytes += line.length;
    for (const b of this.budgets) b.used += line.length;
    this.emit('event', full);
    if (full.event === 'exit') this.close();
    return full;
  }

  close(): void {
    this.finished = true;
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
    this.emit('closed');
  }
}

/** What a replay reads of the log at a time (it grows only for a longer line). */
const replayChunk = 64 * 1024;

/**
 * Every event of an exec from the first, then live ones until the exit event. The log file is
 * complete (an event is written before it is told), so a reader only ever reads the file, from
 * its own offset and at its own pace, and waits for a wake-up when it has reached the end: it
 * holds a read buffer and a position, whatever its speed and however long the exec runs.
 * Only whole lines are parsed (a line still being written waits for the next read); seq keeps
 * the order and drops anything seen before. An exit that could not be written (full disk) is
 * still told: it is the one event a reader keeps from the live side.
 */
export async function* replayExec(path: string, live: ExecLog | undefined): AsyncGenerator<ExecEvent> {
  let changed = false;
  let wake: (() => void) | undefined;
  let exit: ExecEvent | undefined;
  const onEvent = (e: ExecEvent): void => {
    if (e.event === 'exit') exit = e;
    changed = true;
    wake?.();
  };
  const onClosed = (): void => {
    changed = true;
    wake?.();
  };
  const watching = live !== undefined && !live.done;
  if (watching) {
    live.on('event', onEvent);
    live.on('closed', onClosed);
  }
  let file: FileHandle | undefined;
  try {
    let buf = Buffer.allocUnsafe(replayChunk);
    /** Bytes of `buf` read but not yet parsed: the start of a line whose end is not read yet. */
    let held = 0;
    /** File offset of buf[0]. */
    let offset = 0;
    let last = 0;
    for (;;) {
      // Decided before reading: if the log was closed by then, this read sees all of it.
      const complete = !watching || live.done;
      changed = false;
      if (held === buf.length) {
        const bigger = Buffer.allocUnsafe(buf.length * 2);
        buf.copy(bigger, 0, 0, held);
        buf = bigger;
      }
      file ??= await openForReplay(path);
      const n = file ? (await file.read(buf, held, buf.length - held, offset + held)).bytesRead : 0;
      held += n;
      const data = buf.subarray(0, held);
      let start = 0;
      for (let nl = data.indexOf(10); nl >= 0; nl = data.indexOf(10, start)) {
        const line = data.toString('utf8', start, nl);
        start = nl + 1;
        let e: ExecEvent;
        try {
          e = JSON.parse(line) as ExecEvent;
        } catch {
          continue; // a line a failed write left half-written: what follows is still good
        }
        if (e.seq <= last) continue;
        last = e.seq;
        yield e;
        if (e.event === 'exit') return;
      }
      buf.copy(buf, 0, start, held);
      held -= start;
      offset += start;
      if (n > 0) continue;
      // At the end of the file. The start of a line being written is read again next time
      // (whole, whatever became of it), and nothing is held open while waiting: a silent exec
      // may run for days.
      held = 0;
      await file?.close();
      file = undefined;
      if (complete) {
        if (exit && exit.seq > last) yield exit;
        return;
      }
      if (!changed)
        await new Promise<void>((r) => {
          wake = r;
        });
      wake = undefined;
    }
  } finally {
    live?.off('event', onEvent);
    live?.off('closed', onClosed);
    await file?.close();
  }
}

async function openForReplay(path: string): Promise<FileHandle | undefined> {
  try {
    return await open(path, 'r');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined; // nothing written yet
    throw e;
  }
}

/**
 * Ends the log of an exec whose stream died with an earlier daemon: appends its exit event
 * after the last complete one (a half-written last line is cut), so readers still see an end.
 */
export function endOrphanLog(path: string, reason: string): void {
  let text = '';
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    // never wrote anything
  }
  let seq = 0;
  let keep = 0;
  for (const line of text.split('\n')) {
    try {
      const e = JSON.parse(line) as ExecEvent;
      if (e.seq !== seq + 1) break;
      seq = e.seq;
      keep += Buffer.byteLength(line) + 1;
    } catch {
      break;
    }
  }
  if (keep < Buffer.byteLength(text)) truncateSync(path, keep);
  const exit: ExecEvent = {
    event: 'exit',
    stream: null,
    data: JSON.stringify({ exit_code: null, status: 'failed', signal: null, error: reason }),
    seq: seq + 1,
  };
  appendFileSync(path, `${JSON.stringify(exit)}\n`);
}
