import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { type ExecStreamEvent, incompleteUtf8Tail, OutputEncoder } from '../../src/api/exec-stream.js';

function decode(events: (ExecStreamEvent | undefined)[]): Buffer {
  const parts: Buffer[] = [];
  for (const e of events) {
    if (!e) continue;
    assert.ok(e.type === 'stdout');
    parts.push(Buffer.from(e.data, e.encoding === 'base64' ? 'base64' : 'utf8'));
  }
  return Buffer.concat(parts);
}

/** Feeds `bytes` in chunks of the given sizes, then flushes. */
function encode(bytes: Buffer, sizes: number[]): ExecStreamEvent[] {
  const enc = new OutputEncoder('stdout');
  const out: ExecStreamEvent[] = [];
  let i = 0;
  let k = 0;
  while (i < bytes.length) {
    const n = sizes[k++ % sizes.length] ?? 1;
    const e = enc.push(bytes.subarray(i, i + n));
    if (e) out.push(e);
    i += n;
  }
  const e = enc.flush();
  if (e) out.push(e);
  return out;
}

test('incompleteUtf8Tail finds an unfinished sequence only', () => {
  assert.equal(incompleteUtf8Tail(Buffer.from('abc')), 0);
  assert.equal(incompleteUtf8Tail(Buffer.from('é')), 0);
  assert.equal(incompleteUtf8Tail(Buffer.from('é').subarray(0, 1)), 1);
  assert.equal(incompleteUtf8Tail(Buffer.from('€').subarray(0, 2)), 2);
  assert.equal(incompleteUtf8Tail(Buffer.from('😀').subarray(0, 3)), 3);
  assert.equal(incompleteUtf8Tail(Buffer.from([0xff])), 0);
});

test('UTF-8 split anywhere comes out as text lines, never a split character', () => {
  const text = Buffer.from('héllo wörld €uro 😀 '.repeat(50));
  for (const sizes of [[1], [2], [3], [5, 7], [4096]]) {
    const events = encode(text, sizes);
    for (const e of events) assert.ok(e.type === 'stdout' && e.encoding === undefined, JSON.stringify(e));
    assert.deepEqual(decode(events), text);
  }
});

test('bytes that are not UTF-8 round-trip exactly through base64', () => {
  const bytes = Buffer.concat([Buffer.from([0xff, 0xfe, 0x00]), Buffer.from('abc é'), randomBytes(10_000)]);
  for (const sizes of [[1], [3, 11], [65536]]) {
    const events = encode(bytes, sizes);
    assert.ok(events.some((e) => e.type === 'stdout' && e.encoding === 'base64'));
    assert.deepEqual(decode(events), bytes);
  }
});
