import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { HeldText, OutputBudget } from '../../src/engine/output-budget.js';
import type { AgentConnection } from '../../src/guest/agent-connection.js';
import { OutputChunks } from '../../src/guest/output-chunks.js';
import { AgentProcess } from '../helpers/agent-harness.js';

/** Bytes that stress a decoder: valid sequences of every length, stray and truncated ones. */
function awkwardBytes(n: number): Buffer {
  const pieces = [
    Buffer.from('aé€😀"\\\n\t\u0001'),
    Buffer.from([0xff, 0xfe, 0x80, 0xc3]),
    Buffer.from([0xe2, 0x82]),
    Buffer.from([0xf0, 0x9f, 0x98]),
    Buffer.from([0xed, 0xa0, 0x80]),
  ];
  const out: Buffer[] = [];
  let size = 0;
  while (size < n) {
    const p = Math.random() < 0.3 ? randomBytes(1 + Math.floor(Math.random() * 40)) : pieces[size % 5];
    out.push(p as Buffer);
    size += (p as Buffer).length;
  }
  return Buffer.concat(out).subarray(0, n);
}

test('a held output written in pieces is exactly JSON.stringify of the whole decoded text', () => {
  for (const size of [0, 1, 3, 65535, 65536, 65537, 200_000, 1_000_000]) {
    const bytes = awkwardBytes(size);
    // Chunked at odd places, so slices and chunks end inside sequences.
    const chunks = new OutputChunks();
    for (let off = 0; off < bytes.length; ) {
      const n = 1 + Math.floor(Math.random() * 9000);
      chunks.push(bytes.subarray(off, off + n));
      off += n;
    }
    const held = new HeldText(chunks);
    assert.equal([...held.jsonPieces()].join(''), JSON.stringify(bytes.toString('utf8')), `size ${size}`);
    assert.equal(JSON.stringify({ s: held }), JSON.stringify({ s: bytes.toString('utf8') }));
  }
});

test('the budget grants what is left, and a held output gives its share back once', () => {
  const budget = new OutputBudget(1000);
  assert.equal(budget.take(600), 600);
  assert.equal(budget.take(600), 400);
  assert.equal(budget.take(1), 0);
  budget.release(400);
  const chunks = new OutputChunks();
  chunks.push(Buffer.alloc(600, 'x'));
  const held = new HeldText(chunks, budget);
  held.release();
  held.release();
  assert.equal(budget.inUse, 0);
  assert.equal(held.bytes, 0);
});

test('tiny chunks cost about their bytes, not the buffers they are views of', () => {
  const chunks = new OutputChunks();
  const big = Buffer.alloc(16384, 'y');
  for (let i = 0; i < 1000; i++) chunks.push(big.subarray(i, i + 3));
  const parts = chunks.chunks();
  assert.equal(chunks.bytes, 3000);
  assert.ok(parts.every((p) => p.buffer !== big.buffer));
  assert.equal(parts.length, 1);
  assert.equal(chunks.concat().toString(), 'y'.repeat(3000));
});

describe('execBuffered against the real agent', { timeout: 40000 }, () => {
  let agent: AgentProcess;
  let conn: AgentConnection;
  before(async () => {
    agent = await AgentProcess.start();
    conn = await agent.connect();
  });
  after(async () => {
    if (agent.child.exitCode === null) await agent.hangUp(conn);
    await agent.stop();
  });

  test('keeps a prefix of each stream within the per-stream cap and the shared budget', async () => {
    const budget = new OutputBudget(300_000);
    const cmd = 'head -c 500000 /dev/zero | tr "\\0" a; head -c 500000 /dev/zero | tr "\\0" b >&2';
    const r = await conn.execBuffered(
      { argv: ['sh', '-c', cmd] },
      { maxOutputBytes: 200_000, allowance: budget },
    );
    assert.equal(r.exitCode, 0);
    assert.equal(r.truncated, true);
    const out = r.stdout.concat().toString();
    const err = r.stderr.concat().toString();
    assert.ok(out.length <= 200_000 && err.length <= 200_000);
    assert.equal(out.length + err.length, 300_000, 'the budget was used to the end');
    assert.match(out, /^a*$/);
    assert.match(err, /^b*$/);
    assert.equal(budget.inUse, 300_000);
    new HeldText(r.stdout, budget).release();
    new HeldText(r.stderr, budget).release();
    assert.equal(budget.inUse, 0);
    // With the budget spent elsewhere, a command still runs: its output is cut from the start.
    budget.take(300_000);
    const none = await conn.execBuffered(
      { argv: ['echo', 'hi'] },
      { maxOutputBytes: 1000, allowance: budget },
    );
    assert.equal(none.exitCode, 0);
    assert.equal(none.stdout.bytes, 0);
    assert.equal(none.truncated, true);
  });
});
