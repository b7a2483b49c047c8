import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  canonicalText,
  decodeFrame,
  decodeMessage,
  encodeFrame,
  encodeTlv,
  type Frame,
  FrameDecoder,
  FrameType,
  HEADER_SIZE,
  MAX_FRAME_LEN,
  MAX_FRAME_SIZE,
  MAX_PAYLOAD,
  ProtocolError,
  parseTlv,
  quoteBytes,
  SequenceScanner,
} from '../../src/guest/protocol.js';
import {
  encodeConfigure,
  encodeCredit,
  encodeExec,
  encodeFileRead,
  encodeFileWrite,
  encodePing,
  encodeResize,
  encodeSignal,
  execPayloadBound,
  parseDone,
  parseError,
  parseExit,
} from '../../src/guest/protocol-messages.js';
import { prng } from '../helpers/prng.js';

function kindOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof ProtocolError) return err.kind;
    throw err;
  }
  return '(no error)';
}

function sampleFrames(): Buffer[] {
  return [
    encodePing(Buffer.from('0123456789abcdef')),
    encodeExec(1, {
      argv: ['sh', '-c', 'echo hi'],
      env: { A: '1' },
      cwd: '/tmp',
      pty: { cols: 80, rows: 24 },
    }),
    encodeFrame(FrameType.STARTED, 1, Buffer.from([0, 0, 4, 210])),
    encodeFrame(FrameType.STDOUT, 1, Buffer.alloc(MAX_PAYLOAD, 0x41)),
    encodeFrame(FrameType.STDERR, 1, Buffer.from('oops\n')),
    encodeFrame(FrameType.STDOUT, 1, Buffer.alloc(0)),
    encodeCredit(1, 65536),
    encodeFrame(FrameType.EXIT, 1, encodeTlv([{ tag: 1, value: Buffer.from([0, 0, 0, 3]) }])),
    encodeFrame(FrameType.DATA, 7, Buffer.alloc(1000, 0xff)),
    encodeFrame(FrameType.POWEROFF, 0),
  ];
}

function collect(dec: FrameDecoder, chunks: Buffer[]): Frame[] {
  const out: Frame[] = [];
  for (const c of chunks) dec.feed(c, (f) => out.push({ ...f, payload: Buffer.from(f.payload) }));
  return out;
}

describe('FrameDecoder', () => {
  const frames = sampleFrames();
  const wire = Buffer.concat(frames);
  const expected = frames.map((f) => canonicalText(decodeFrame(f)));

  it('decodes a stream fed one byte at a time', () => {
    const dec = new FrameDecoder();
    const chunks: Buffer[] = [];
    for (let i = 0; i < wire.length; i++) chunks.push(wire.subarray(i, i + 1));
    const got = collect(dec, chunks);
    assert.deepEqual(
      got.map((f) => canonicalText(f)),
      expected,
    );
    assert.equal(dec.bufferedBytes, 0);
  });

  it('decodes a stream cut at random boundaries (many seeds)', () => {
    for (let seed = 1; seed <= 50; seed++) {
      const rnd = prng(seed);
      const chunks: Buffer[] = [];
      for (let off = 0; off < wire.length; ) {
        const n = 1 + Math.floor(rnd() * (rnd() < 0.5 ? 16 : 70000));
        chunks.push(wire.subarray(off, off + n));
        off += n;
      }
      const got = collect(new FrameDecoder(), chunks);
      assert.deepEqual(
        got.map((f) => canonicalText(f)),
        expected,
        `seed ${seed}`,
      );
    }
  });

  it('accepts empty chunks and a whole stream in one chunk', () => {
    const dec = new FrameDecoder();
    assert.equal(collect(dec, [Buffer.alloc(0), wire, Buffer.alloc(0)]).length, frames.length);
  });

  it('rejects a bad length as soon as the 4 length bytes are in', () => {
    const dec = new FrameDecoder();
    dec.feed(Buffer.from([0x00]), () => {});
    dec.feed(Buffer.from([0x01]), () => {});
    dec.feed(Buffer.from([0x00]), () => {});
    assert.equal(
      kindOf(() => dec.feed(Buffer.from([0x06]), () => {})),
      'too-large',
    );
    const small = new FrameDecoder();
    assert.equal(
      kindOf(() => small.feed(Buffer.from([0, 0, 0, 4]), () => {})),
      'too-small',
    );
  });

  it('frames an unknown type by its length, so a reader can skip it whole', () => {
    const dec = new FrameDecoder();
    const unknown = encodeFrame(0x77, 3, Buffer.from('from a newer peer'));
    const got: Frame[] = [];
    dec.feed(Buffer.concat([unknown, frames[0]!]), (f) =>
      got.push({ ...f, payload: Buffer.from(f.payload) }),
    );
    assert.deepEqual(
      got.map((f) => [f.type, f.stream]),
      [
        [0x77, 3],
        [decodeFrame(frames[0]!).type, decodeFrame(frames[0]!).stream],
      ],
    );
    // Only the message layer names the problem.
    assert.equal(
      kindOf(() => decodeMessage(got[0]!)),
      'bad-type',
    );
  });

  it('delivers the good frames before a bad one, then stays dead', () => {
    const dec = new FrameDecoder();
    const got: string[] = [];
    const bad = Buffer.concat([frames[0]!, frames[4]!, Buffer.from('GARBAGE GARBAGE')]);
    assert.equal(
      kindOf(() => dec.feed(bad, (f) => got.push(canonicalText(f)))),
      'too-large',
    );
    assert.deepEqual(got, [expected[0], expected[4]]);
    assert.equal(dec.error?.kind, 'too-large');
    assert.equal(dec.bufferedBytes, 0);
    // Even a valid frame is refused now.
    assert.equal(
      kindOf(() => dec.feed(frames[0]!, () => assert.fail('frame after error'))),
      'too-large',
    );
  });

  it('never buffers more than one frame, whatever the peer announces', () => {
    // A maximal frame fed byte by byte: the buffer never exceeds the frame itself.
    const big = encodeFrame(FrameType.STDOUT, 3, Buffer.alloc(MAX_PAYLOAD, 7));
    assert.equal(big.length, MAX_FRAME_SIZE);
    const dec = new FrameDecoder();
    let max = 0;
    let n = 0;
    for (let i = 0; i < big.length; i++) {
      dec.feed(big.subarray(i, i + 1), () => n++);
      max = Math.max(max, dec.bufferedBytes);
    }
    assert.equal(n, 1);
    assert.ok(max < MAX_FRAME_SIZE, `buffered ${max}`);
    // 20 MB of frames in 3000-byte chunks: the buffer stays below one frame + one chunk.
    const dec2 = new FrameDecoder();
    let bytes = 0;
    let peak = 0;
    for (let i = 0; i < 320; i++) {
      for (let off = 0; off < big.length; off += 3000) {
        dec2.feed(big.subarray(off, off + 3000), (f) => {
          bytes += f.payload.length;
        });
        peak = Math.max(peak, dec2.bufferedBytes);
      }
    }
    assert.equal(bytes, 320 * MAX_PAYLOAD);
    assert.ok(peak <= MAX_FRAME_SIZE + 3000, `peak ${peak}`);
    // A header announcing 4 GiB is refused at once, with nothing buffered.
    const dec3 = new FrameDecoder();
    assert.equal(
      kindOf(() => dec3.feed(Buffer.from([0xff, 0xff, 0xff, 0xff, 0x13]), () => {})),
      'too-large',
    );
    assert.equal(dec3.bufferedBytes, 0);
  });

  it('the limits are those of the doc', () => {
    assert.equal(MAX_FRAME_LEN, 5 + 65536);
    const ok = Buffer.alloc(4 + MAX_FRAME_LEN);
    ok.writeUInt32BE(MAX_FRAME_LEN, 0);
    ok.writeUInt8(FrameType.DATA, 4);
    assert.equal(decodeFrame(ok).payload.length, 65536);
    assert.throws(() => encodeFrame(FrameType.DATA, 1, Buffer.alloc(MAX_PAYLOAD + 1)), RangeError);
  });
});

describe('SequenceScanner (handshake resync)', () => {
  const pong = encodeFrame(FrameType.PONG, 0, Buffer.from('nonce-nonce-1234'));

  it('finds the PONG after garbage, stale frames and near-misses, over 1-byte chunks', () => {
    const stale = Buffer.concat([
      Buffer.from('junk\x00\xff'),
      encodeFrame(FrameType.STDOUT, 4, Buffer.from('left over from an earlier connection')),
      pong.subarray(0, pong.length - 1), // a prefix that does not complete
      encodeFrame(FrameType.PONG, 0, Buffer.from('nonce-nonce-1235')), // another nonce
      pong.subarray(0, 7),
    ]);
    const after = encodeFrame(FrameType.STARTED, 1, Buffer.from([0, 0, 0, 1]));
    const wire = Buffer.concat([stale, pong, after]);
    const sc = new SequenceScanner(pong);
    let rest: Buffer | null = null;
    let i = 0;
    for (; i < wire.length && rest === null; i++) {
      rest = sc.push(wire.subarray(i, i + 1));
      assert.ok(sc.bufferedBytes < pong.length);
    }
    assert.notEqual(rest, null);
    assert.equal(i, stale.length + pong.length);
    assert.equal(rest!.length, 0);
    assert.equal(sc.discarded, stale.length);
    // The bytes after the PONG, delivered with it in one chunk, are handed back whole.
    const sc2 = new SequenceScanner(pong);
    assert.equal(sc2.push(stale.subarray(0, 10)), null);
    assert.deepEqual(sc2.push(wire.subarray(10)), after);
  });

  it('holds fewer bytes than the pattern however much garbage comes', () => {
    const sc = new SequenceScanner(pong);
    const junk = Buffer.alloc(65536, 0);
    for (let i = 0; i < 64; i++) {
      assert.equal(sc.push(junk), null);
      assert.ok(sc.bufferedBytes < pong.length);
    }
    assert.ok(sc.discarded > 4_000_000);
  });

  it('finds a PONG split across two chunks', () => {
    const sc = new SequenceScanner(pong);
    assert.equal(sc.push(Buffer.concat([Buffer.from('xx'), pong.subarray(0, 9)])), null);
    assert.deepEqual(sc.push(pong.subarray(9)), Buffer.alloc(0));
  });
});

describe('messages', () => {
  it('prints canonical text with the escapes of the doc', () => {
    assert.equal(quoteBytes(Buffer.from('a"b\\c\n\x7f~ ')), '"a\\x22b\\x5cc\\x0a\\x7f~ "');
    assert.equal(canonicalText(decodeFrame(encodeFrame(FrameType.CANCEL, 9))), 'CANCEL stream=9');
  });

  it('encodes EXEC with every field, in order', () => {
    const f = decodeFrame(
      encodeExec(5, {
        argv: ['ls', '-l'],
        env: { A: 'x=y' },
        cwd: '/w',
        pty: { cols: 100, rows: 40 },
        timeoutMs: 1500,
        stdin: true,
      }),
    );
    assert.equal(
      canonicalText(f),
      'EXEC stream=5 arg="ls" arg="-l" env="A=x=y" cwd="/w" pty=100x40 timeout_ms=1500 stdin=1',
    );
    assert.equal(
      canonicalText(decodeFrame(encodeExec(6, { argv: ['true'] }))),
      'EXEC stream=6 arg="true" stdin=0',
    );
  });

  it('refuses requests the agent could not honour', () => {
    assert.throws(() => encodeExec(1, { argv: [] }), TypeError);
    assert.throws(() => encodeExec(1, { argv: ['a\0b'] }), TypeError);
    assert.throws(() => encodeExec(1, { argv: ['env'], env: { 'A=B': 'c' } }), TypeError);
    assert.throws(() => encodeExec(1, { argv: ['x'], pty: { cols: 70000, rows: 1 } }), RangeError);
    assert.throws(() => encodeExec(1, { argv: ['x'.repeat(MAX_PAYLOAD)] }), RangeError);
    assert.throws(() => encodeFileRead(1, '/a\0'), TypeError);
    assert.throws(() => encodePing(Buffer.alloc(65)), RangeError);
    assert.throws(() => encodeCredit(1, 2 ** 32), RangeError);
  });

  it('bounds the EXEC payload from argv, env and cwd alone', () => {
    const req = { argv: ['sh', '-c', 'é€😀'], env: { A: 'x=y', LANG: 'C.UTF-8' }, cwd: '/w' };
    const full = encodeExec(1, { ...req, pty: { cols: 80, rows: 24 }, timeoutMs: 1, stdin: true });
    assert.equal(full.length - HEADER_SIZE, execPayloadBound(req));
    assert.ok(encodeExec(1, req).length - HEADER_SIZE < execPayloadBound(req));
    const fits = { argv: ['x'.repeat(MAX_PAYLOAD - execPayloadBound({ argv: [''] }))] };
    assert.equal(execPayloadBound(fits), MAX_PAYLOAD);
    encodeExec(1, { ...fits, pty: { cols: 1, rows: 1 }, timeoutMs: 1 });
    assert.throws(() =>
      encodeExec(1, { argv: [`${fits.argv[0]}x`], timeoutMs: 1, pty: { cols: 1, rows: 1 } }),
    );
  });

  it('encodes the other host frames', () => {
    const t = (b: Buffer) => canonicalText(decodeFrame(b));
    assert.equal(
      t(encodeFileWrite(2, '/a', { mode: 0o600, mkdirs: true })),
      'FILE_WRITE stream=2 path="/a" mode=384 mkdirs=1',
    );
    assert.equal(t(encodeFileWrite(2, '/a', {})), 'FILE_WRITE stream=2 path="/a"');
    assert.equal(t(encodeFileRead(3, '/b')), 'FILE_READ stream=3 path="/b"');
    assert.equal(t(encodeSignal(4, 15)), 'SIGNAL stream=4 signal=15');
    assert.equal(t(encodeResize(4, 132, 43)), 'RESIZE stream=4 cols=132 rows=43');
    assert.equal(t(encodeCredit(4, 262144)), 'CREDIT stream=4 bytes=262144');
  });

  it('encodes CONFIGURE in tag order, leaving the values to the agent', () => {
    const t = (b: Buffer) => canonicalText(decodeFrame(b));
    assert.equal(
      t(
        encodeConfigure(8, {
          machineId: '0123456789abcdef0123456789abcdef',
          entropy: Buffer.from([0, 0x41, 0xff]),
          timeNs: 1732284000123456789n,
          hostname: 'clone-1',
        }),
      ),
      'CONFIGURE stream=8 hostname="clone-1" time_ns=1732284000123456789 entropy="\\x00A\\xff"' +
        ' machine_id="0123456789abcdef0123456789abcdef"',
    );
    assert.equal(t(encodeConfigure(9, {})), 'CONFIGURE stream=9');
    assert.equal(
      t(encodeConfigure(9, { timeNs: 2n ** 64n - 1n })),
      'CONFIGURE stream=9 time_ns=18446744073709551615',
    );
    // The agent judges hostnames and machine ids (EINVAL); the encoder only refuses the unencodable.
    assert.equal(t(encodeConfigure(9, { hostname: 'bad_name' })), 'CONFIGURE stream=9 hostname="bad_name"');
    assert.throws(() => encodeConfigure(1, { timeNs: -1n }), RangeError);
    assert.throws(() => encodeConfigure(1, { timeNs: 2n ** 64n }), RangeError);
    assert.throws(() => encodeConfigure(1, { entropy: Buffer.alloc(MAX_PAYLOAD) }), RangeError);
    // time_ns is exactly 8 bytes, like every fixed-size field.
    const cfg = (value: Buffer) => encodeFrame(FrameType.CONFIGURE, 1, encodeTlv([{ tag: 2, value }]));
    assert.equal(
      kindOf(() => decodeMessage(decodeFrame(cfg(Buffer.alloc(7))))),
      'truncated',
    );
    assert.equal(
      kindOf(() => decodeMessage(decodeFrame(cfg(Buffer.alloc(9))))),
      'bad-length',
    );
  });

  it('parses the agent frames, skipping unknown tags', () => {
    const tlv = (type: number, fields: [number, Buffer][]) =>
      decodeMessage(
        decodeFrame(encodeFrame(type, 1, encodeTlv(fields.map(([tag, value]) => ({ tag, value }))))),
      );
    const u32 = (n: number) => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(n);
      return b;
    };
    assert.deepEqual(
      parseExit(
        tlv(FrameType.EXIT, [
          [9, Buffer.from('zz')],
          [1, u32(7)],
        ]),
      ),
      {
        exitCode: 7,
        signal: null,
        timedOut: false,
      },
    );
    assert.deepEqual(
      parseExit(
        tlv(FrameType.EXIT, [
          [2, u32(9)],
          [3, Buffer.from([1])],
        ]),
      ),
      {
        exitCode: null,
        signal: 9,
        timedOut: true,
      },
    );
    assert.deepEqual(
      parseError(
        tlv(FrameType.ERROR, [
          [1, Buffer.from('ENOENT')],
          [2, Buffer.from('no such')],
        ]),
      ),
      {
        code: 'ENOENT',
        message: 'no such',
      },
    );
    const size = Buffer.alloc(8);
    size.writeBigUInt64BE(5n * 1024n * 1024n);
    assert.deepEqual(
      parseDone(
        tlv(FrameType.DONE, [
          [1, size],
          [2, u32(0o644)],
        ]),
      ),
      { size: 5242880, mode: 0o644 },
    );
    assert.deepEqual(parseTlv(Buffer.alloc(0)), []);
    assert.equal(
      kindOf(() => parseTlv(Buffer.from([1, 0, 0, 0, 9, 1]))),
      'truncated',
    );
  });

  it('rejects a fixed value that is too long and payloads the host never accepts', () => {
    assert.equal(
      kindOf(() => decodeMessage(decodeFrame(encodeFrame(FrameType.CREDIT, 1, Buffer.alloc(5))))),
      'bad-length',
    );
    assert.equal(
      kindOf(() => decodeMessage(decodeFrame(encodeFrame(FrameType.PONG, 0, Buffer.alloc(65))))),
      'too-large',
    );
    assert.equal(
      kindOf(() => decodeFrame(Buffer.concat([encodeFrame(FrameType.CANCEL, 1), Buffer.from([0])]))),
      'bad-length',
    );
  });
});
