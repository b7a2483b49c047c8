import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { type ExecEvent, ExecLog, endOrphanLog, replayExec, Utf8Chunker } from '../../src/engine/exec-log.js';

test('Utf8Chunker never cuts a character and carries non-UTF-8 as base64', () => {
  const text = Buffer.from('aé€😀z'.repeat(50));
  for (let size = 1; size <= 7; size++) {
    const c = new Utf8Chunker();
    const parts: string[] = [];
    for (let i = 0; i < text.length; i += size) {
      const r = c.push(text.subarray(i, i + size));
      if (r) {
        assert.equal(r.encoding, undefined, `chunk size ${size}`);
        parts.push(r.data);
      }
    }
    const tail = c.flush();
    if (tail) parts.push(tail.data);
    assert.equal(parts.join(''), text.toString());
  }
  const c = new Utf8Chunker();
  const bin = Buffer.from([0x66, 0xff, 0xfe, 0x00, 0xc3]);
  const r = c.push(bin);
  // The trailing 0xc3 could start a character: it waits; the rest is not UTF-8.
  assert.deepEqual(r, { data: Buffer.from([0x66, 0xff, 0xfe, 0x00]).toString('base64'), encoding: 'base64' });
  assert.deepEqual(c.flush(), { data: Buffer.from([0xc3]).toString('base64'), encoding: 'base64' });
});

test('replay gives every event once, in order, whether it starts before, during or after the run', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-execlog-'));
  try {
    const path = join(dir, 'x.ndjson');
    const log = new ExecLog(path);
    const early = replayExec(path, log);
    const earlyDone = (async () => {
      const seen: number[] = [];
      for await (const e of early) seen.push(e.seq);
      return seen;
    })();
    for (let i = 0; i < 500; i++) log.append({ event: 'log', stream: 'stdout', data: `line ${i}\n` });
    const mid = replayExec(path, log);
    const midDone = (async () => {
      const seen: number[] = [];
      for await (const e of mid) seen.push(e.seq);
      return seen;
    })();
    for (let i = 0; i < 500; i++) {
      log.append({ event: 'log', stream: 'stderr', data: `more ${i}\n` });
      if (i % 50 === 0) await new Promise((r) => setImmediate(r));
    }
    log.append({ event: 'exit', stream: null, data: '{"exit_code":0}' });
    const all = Array.from({ length: 1001 }, (_, i) => i + 1);
    assert.deepEqual(await earlyDone, all);
    assert.deepEqual(await midDone, all);
    const late: ExecEvent[] = [];
    for await (const e of replayExec(path, undefined)) late.push(e);
    assert.deepEqual(
      late.map((e) => e.seq),
      all,
    );
    assert.equal(late.at(-1)?.event, 'exit');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an orphaned log gets an exit event after its last whole line', () => {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-execlog-'));
  try {
    const path = join(dir, 'x.ndjson');
    writeFileSync(
      path,
      `${JSON.stringify({ event: 'log', stream: 'stdout', data: 'a', seq: 1 })}\n{"event":"log","str`,
    );
    endOrphanLog(path, 'daemon restarted');
    const lines = readFileSync(path, 'utf8').trim().split('\n');
    assert.equal(lines.length, 2);
    const exit = JSON.parse(lines[1] ?? '') as ExecEvent;
    assert.equal(exit.event, 'exit');
    assert.equal(exit.seq, 2);
    assert.match(exit.data, /daemon restarted/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a log stops recording output at its cap or on a failed write, and still ends', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-execlog-'));
  try {
    const path = join(dir, 'x.ndjson');
    const log = new ExecLog(path, 1000);
    let kept = 0;
    for (let i = 0; i < 100; i++)
      if (log.append({ event: 'log', stream: 'stdout', data: 'x'.repeat(50) })) kept++;
    assert.ok(kept > 5 && kept < 20, `kept ${kept}`);
    assert.equal(log.truncated, true);
    const exit = log.append({ event: 'exit', stream: null, data: '{}' });
    assert.equal(exit?.seq, kept + 1);
    const seen: number[] = [];
    for await (const e of replayExec(path, undefined)) seen.push(e.seq);
    assert.deepEqual(
      seen,
      Array.from({ length: kept + 1 }, (_, i) => i + 1),
    );
    // /dev/full: every write fails with ENOSPC, as on a full disk. Nothing throws.
    const full = new ExecLog('/dev/full');
    assert.equal(full.append({ event: 'log', stream: 'stdout', data: 'a' }), undefined);
    assert.equal(full.truncated, true);
    assert.equal(full.append({ event: 'exit', stream: null, data: '{}' })?.event, 'exit');
    assert.equal(full.done, true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A live log written by hand: the test decides what is in the file and when readers are told. */
function handLog(): ExecLog & { done: boolean } {
  return Object.assign(new EventEmitter(), { done: false }) as unknown as ExecLog & { done: boolean };
}

const line = (e: ExecEvent): string => `${JSON.stringify(e)}\n`;
const logEvent = (seq: number, data: string): ExecEvent => ({ event: 'log', stream: 'stdout', data, seq });

test('a replay reads only whole lines, and a reader that stalls catches up from the file', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-execlog-'));
  try {
    const path = join(dir, 'x.ndjson');
    const live = handLog();
    writeFileSync(path, line(logEvent(1, 'one')));
    const reader = replayExec(path, live);
    assert.equal((await reader.next()).value?.seq, 1);
    // Half a line: the reader is told, reads, and must wait for the rest rather than parse it.
    const two = line(logEvent(2, 'x'.repeat(200_000)));
    appendFileSync(path, two.slice(0, 1000));
    const next = reader.next();
    live.emit('event', logEvent(2, ''));
    await new Promise((r) => setTimeout(r, 50));
    appendFileSync(path, two.slice(1000));
    live.emit('event', logEvent(2, ''));
    const got = await next;
    assert.equal(got.value?.seq, 2);
    assert.equal(got.value?.data.length, 200_000);
    // Stalled (no next() for a while) while many events are written: all are there later.
    for (let seq = 3; seq <= 2000; seq++) {
      appendFileSync(path, line(logEvent(seq, `line ${seq}`)));
      live.emit('event', logEvent(seq, ''));
    }
    const exit: ExecEvent = { event: 'exit', stream: null, data: '{}', seq: 2001 };
    appendFileSync(path, line(exit));
    live.emit('event', exit);
    live.done = true;
    live.emit('closed');
    const seen: number[] = [];
    for await (const e of reader) seen.push(e.seq);
    assert.deepEqual(
      seen,
      Array.from({ length: 1999 }, (_, i) => i + 3),
    );
    assert.equal(live.listenerCount('event'), 0, 'the reader let go of the log');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an exit the disk refused is still told to live readers; a garbled line is skipped', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-execlog-'));
  try {
    const path = join(dir, 'x.ndjson');
    const live = handLog();
    writeFileSync(path, `${line(logEvent(1, 'a'))}{"event":"log","str\n${line(logEvent(3, 'c'))}`);
    const reader = replayExec(path, live);
    const first = await reader.next();
    assert.equal(first.value?.seq, 1);
    const rest = (async () => {
      const seen: ExecEvent[] = [];
      for await (const e of reader) seen.push(e);
      return seen;
    })();
    await new Promise((r) => setTimeout(r, 20));
    // The exit event's write failed (full disk): only the live side has it.
    live.emit('event', { event: 'exit', stream: null, data: '{"status":"failed"}', seq: 4 });
    live.done = true;
    live.emit('closed');
    const seen = await rest;
    assert.deepEqual(
      seen.map((e) => [e.seq, e.event]),
      [
        [3, 'log'],
        [4, 'exit'],
      ],
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
