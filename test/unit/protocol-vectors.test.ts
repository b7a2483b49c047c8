import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import {
  canonicalText,
  decodeFrame,
  decodeMessage,
  encodeMessage,
  type Frame,
  FrameDecoder,
  ProtocolError,
} from '../../src/guest/protocol.js';
import { repoRoot } from '../helpers/agent-harness.js';

interface Vector {
  line: number;
  name: string;
  bytes: Buffer;
  expect: string;
  valid: boolean;
}

function loadVectors(): Vector[] {
  const file = path.join(repoRoot(), 'spec', 'agent-protocol-vectors.txt');
  const out: Vector[] = [];
  readFileSync(file, 'utf8')
    .split('\n')
    .forEach((raw, i) => {
      const line = raw.replace(/\r$/, '');
      if (line === '' || line.startsWith('#')) return;
      const parts = line.split('\t');
      assert.equal(parts.length, 3, `vectors line ${i + 1}: expected 3 TAB-separated fields`);
      const [name, hex, expect] = parts as [string, string, string];
      assert.match(hex, /^([0-9a-f]{2})*$/, `vectors line ${i + 1}: bad hex`);
      const valid = !name.startsWith('!');
      out.push({
        line: i + 1,
        name: valid ? name : name.slice(1),
        bytes: Buffer.from(hex, 'hex'),
        expect,
        valid,
      });
    });
  return out;
}

/** Decodes one frame the way the connection does: streaming decoder, then the payload. */
function decodeStreaming(bytes: Buffer, chunk: number): Frame[] {
  const dec = new FrameDecoder();
  const frames: Frame[] = [];
  for (let off = 0; off < bytes.length; off += chunk) {
    dec.feed(bytes.subarray(off, off + chunk), (f) => frames.push({ ...f, payload: Buffer.from(f.payload) }));
  }
  return frames;
}

function errorKind(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof ProtocolError) return err.kind;
    throw err;
  }
  return '(no error)';
}

const vectors = loadVectors();

describe('spec/agent-protocol-vectors.txt', () => {
  it('has at least 20 vectors, valid and invalid, with unique names', () => {
    assert.ok(vectors.length >= 20, `only ${vectors.length} vectors`);
    assert.ok(vectors.some((v) => v.valid));
    assert.ok(vectors.some((v) => !v.valid));
    assert.equal(new Set(vectors.map((v) => (v.valid ? '' : '!') + v.name)).size, vectors.length);
  });

  for (const v of vectors.filter((x) => x.valid)) {
    it(`${v.name} decodes to its canonical text and re-encodes to the same bytes`, () => {
      const msg = decodeMessage(decodeFrame(v.bytes));
      assert.equal(canonicalText(msg), v.expect);
      assert.deepEqual(encodeMessage(msg), v.bytes);
      // The incremental decoder agrees, whatever the chunking.
      for (const chunk of [1, 7, v.bytes.length]) {
        const frames = decodeStreaming(v.bytes, chunk);
        assert.equal(frames.length, 1);
        assert.equal(canonicalText(frames[0]!), v.expect);
      }
    });
  }

  for (const v of vectors.filter((x) => !x.valid)) {
    it(`!${v.name} is rejected as ${v.expect}`, () => {
      assert.equal(
        errorKind(() => decodeMessage(decodeFrame(v.bytes))),
        v.expect,
      );
      // The streaming decoder rejects header errors from the bytes present (without waiting
      // for an announced payload); payload errors surface when the frame is decoded.
      const kind = errorKind(() => {
        const frames = decodeStreaming(v.bytes, 1);
        // An incomplete frame is simply waited for by a stream decoder.
        if (frames.length === 0) throw new ProtocolError('truncated', 'incomplete frame');
        for (const f of frames) decodeMessage(f);
      });
      assert.equal(kind, v.expect);
    });
  }
});
