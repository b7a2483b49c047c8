import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  buildMessage,
  buildQuery,
  buildReply,
  CLASS_IN,
  type DnsMessage,
  DnsRcode,
  DnsType,
  DnsWireError,
  frameTcp,
  parseMessage,
  readName,
  TcpDeframer,
} from '../../src/net/dns/dns-wire.js';
import { prng } from '../helpers/prng.js';

const header = { id: 0x1234, qr: true, opcode: 0, aa: false, tc: false, rd: true, ra: true, rcode: 0 };

const sample: DnsMessage = {
  header,
  questions: [{ name: 'www.Example.org', type: DnsType.A, class: CLASS_IN }],
  answers: [
    {
      name: 'www.Example.org',
      type: DnsType.CNAME,
      class: CLASS_IN,
      ttl: 30,
      data: { kind: 'name', name: 'cdn.example.net' },
    },
    {
      name: 'cdn.example.net',
      type: DnsType.A,
      class: CLASS_IN,
      ttl: 20,
      data: { kind: 'a', address: '93.184.216.34' },
    },
    {
      name: 'cdn.example.net',
      type: DnsType.AAAA,
      class: CLASS_IN,
      ttl: 20,
      data: { kind: 'aaaa', address: '2001:db8::1' },
    },
    {
      name: 'example.org',
      type: DnsType.MX,
      class: CLASS_IN,
      ttl: 5,
      data: { kind: 'mx', preference: 10, exchange: 'mail.example.org' },
    },
    {
      name: '_imap._tcp.example.org',
      type: DnsType.SRV,
      class: CLASS_IN,
      ttl: 5,
      data: { kind: 'srv', priority: 1, weight: 2, port: 993, target: 'mail.example.org' },
    },
    {
      name: 'example.org',
      type: DnsType.TXT,
      class: CLASS_IN,
      ttl: 5,
      data: { kind: 'raw', bytes: Buffer.from('\x05hello') },
    },
  ],
  authorities: [],
  additionals: [],
};

/** A message of header + the given body bytes, with the given counts. */
function raw(body: number[], counts: [number, number, number, number] = [1, 0, 0, 0]): Buffer {
  const h = Buffer.alloc(12);
  h.writeUInt16BE(7, 0);
  counts.forEach((c, i) => {
    h.writeUInt16BE(c, 4 + i * 2);
  });
  return Buffer.concat([h, Buffer.from(body)]);
}

function rejects(buf: Buffer, why: RegExp): void {
  assert.throws(
    () => parseMessage(buf),
    (e: unknown) => e instanceof DnsWireError && why.test(e.message),
  );
}

describe('dns wire', () => {
  it('round-trips every record kind, with compression', () => {
    const buf = buildMessage(sample);
    assert.deepEqual(parseMessage(buf), sample);
    // 'example.org' appears six times; compressed, the message is far smaller than spelled out.
    assert.ok(buf.length < 230, `message is ${buf.length} bytes`);
  });

  it('formats AAAA addresses canonically', () => {
    for (const a of ['::', '::1', '1::', '2001:db8::1', '1:2:3:4:5:6:7:8', '1:0:0:2::3', 'fe80::1:0:0:1']) {
      const m = buildMessage({
        header,
        questions: [],
        answers: [
          { name: 'x', type: DnsType.AAAA, class: CLASS_IN, ttl: 1, data: { kind: 'aaaa', address: a } },
        ],
      });
      const d = parseMessage(m).answers[0]?.data;
      assert.deepEqual(d, { kind: 'aaaa', address: a });
    }
  });

  it('rejects a pointer to itself, forward, and loops', () => {
    rejects(raw([0xc0, 12, 0, 1, 0, 1]), /backwards/);
    rejects(raw([0xc0, 14, 0, 1, 0, 1, 0]), /backwards/);
    // a label, then a pointer back to that label: would loop forever
    rejects(raw([1, 0x61, 0xc0, 12, 0, 1, 0, 1]), /backwards/);
    // two names: the second points into the first, which points to the second
    rejects(raw([1, 0x61, 0xc0, 18, 0, 1, 0, 1, 1, 0x62, 0xc0, 12, 0, 1, 0, 1], [2, 0, 0, 0]), /backwards/);
    // a valid backward pointer is fine
    const ok = parseMessage(raw([1, 0x61, 0, 0, 1, 0, 1, 1, 0x62, 0xc0, 12, 0, 1, 0, 1], [2, 0, 0, 0]));
    assert.deepEqual(
      ok.questions.map((q) => q.name),
      ['a', 'b.a'],
    );
  });

  it('rejects long labels, long names, reserved label types and bad label bytes', () => {
    rejects(raw([64, ...Array(64).fill(0x61), 0, 0, 1, 0, 1]), /label type|label/);
    const label63 = [63, ...Array(63).fill(0x61)];
    rejects(raw([...label63, ...label63, ...label63, ...label63, 0, 0, 1, 0, 1]), /longer than 255/);
    // 255 exactly is fine: 3×64 + 62 + 1
    parseMessage(raw([...label63, ...label63, ...label63, 61, ...Array(61).fill(0x61), 0, 0, 1, 0, 1]));
    rejects(raw([0x40, 0, 0, 1, 0, 1]), /label type/);
    rejects(raw([0x80, 0, 0, 1, 0, 1]), /label type/);
    rejects(raw([3, 0x61, 0x2e, 0x62, 0, 0, 1, 0, 1]), /label byte/);
    rejects(raw([1, 0, 0, 0, 1, 0, 1]), /label byte/);
    // a name grown past 255 through pointers: each name adds a label to the previous one
    const body: number[] = [63, ...Array(63).fill(0x61), 0, 0, 1, 0, 1];
    let prev = 12;
    for (let i = 0; i < 4; i++) {
      const at = 12 + body.length;
      body.push(63, ...Array(63).fill(0x62), 0xc0 | (prev >> 8), prev & 0xff, 0, 1, 0, 1);
      prev = at;
    }
    rejects(raw(body, [5, 0, 0, 0]), /longer than 255/);
  });

  it('rejects every truncation of a valid message, and trailing bytes', () => {
    const buf = buildMessage(sample);
    for (let n = 0; n < buf.length; n++) {
      assert.throws(() => parseMessage(buf.subarray(0, n)), DnsWireError, `prefix of ${n} bytes`);
    }
    rejects(Buffer.concat([buf, Buffer.from([0])]), /after the last record/);
  });

  it('rejects rdata that lies about its length', () => {
    const a = buildMessage({
      header,
      questions: [],
      answers: [
        {
          name: 'x',
          type: DnsType.A,
          class: CLASS_IN,
          ttl: 1,
          data: { kind: 'raw', bytes: Buffer.alloc(5) },
        },
      ],
    });
    rejects(a, /A record with 5/);
    // a CNAME whose name runs past its rdlength
    const c = buildMessage({
      header,
      questions: [],
      answers: [
        {
          name: 'x',
          type: DnsType.CNAME,
          class: CLASS_IN,
          ttl: 1,
          data: { kind: 'raw', bytes: Buffer.from([3, 0x61, 0x62]) },
        },
      ],
    });
    rejects(c, /truncated|overruns/);
  });

  it('survives random bytes and mutated messages: a message or DnsWireError, nothing else', () => {
    const rnd = prng(1035);
    const seeds = [buildMessage(sample), buildQuery(9, { name: 'a.b.c', type: 1, class: 1 }, 4096)];
    let parsed = 0;
    const t0 = performance.now();
    for (let i = 0; i < 30_000; i++) {
      let buf: Buffer;
      if (i % 2 === 0) {
        buf = Buffer.alloc(Math.floor(rnd() * 300));
        for (let j = 0; j < buf.length; j++) buf[j] = Math.floor(rnd() * 256);
        // small counts make it past the header more often
        if (buf.length >= 12) for (const o of [4, 6, 8, 10]) buf.writeUInt16BE(Math.floor(rnd() * 4), o);
      } else {
        buf = Buffer.from(seeds[i % 4 === 1 ? 0 : 1]!);
        for (let k = 0; k < 1 + rnd() * 4; k++) {
          const at = Math.floor(rnd() * buf.length);
          // compression-pointer bytes are what breaks naive parsers
          buf[at] = rnd() < 0.5 ? 0xc0 | Math.floor(rnd() * 4) : Math.floor(rnd() * 256);
        }
      }
      try {
        const m = parseMessage(buf);
        parsed++;
        // whatever parses can be written again and reads back the same
        assert.deepEqual(parseMessage(buildMessage(m)), m);
      } catch (e) {
        if (!(e instanceof DnsWireError)) throw e;
      }
    }
    assert.ok(parsed > 100, `only ${parsed} parsed: the fuzz does not reach the records`);
    assert.ok(performance.now() - t0 < 10_000);
  });

  it('readName gives the offset after the name, pointers included', () => {
    const buf = raw([1, 0x61, 0, 0, 1, 0, 1, 1, 0x62, 0xc0, 12, 0, 1, 0, 1], [2, 0, 0, 0]);
    assert.deepEqual(readName(buf, 19), { name: 'b.a', next: 23 });
  });

  it('builds replies echoing id, RD and the question', () => {
    const q = parseMessage(buildQuery(0xbeef, { name: 'Pypi.org', type: DnsType.A, class: CLASS_IN }));
    for (const rcode of [DnsRcode.NXDOMAIN, DnsRcode.REFUSED, DnsRcode.SERVFAIL, DnsRcode.NOERROR]) {
      const r = parseMessage(buildReply(q, rcode));
      assert.equal(r.header.id, 0xbeef);
      assert.equal(r.header.qr, true);
      assert.equal(r.header.rd, true);
      assert.equal(r.header.rcode, rcode);
      assert.deepEqual(r.questions, q.questions);
      assert.equal(r.answers.length, 0);
    }
    assert.equal(parseMessage(buildReply(q, 0, { tc: true })).header.tc, true);
  });

  it('refuses to build names that cannot go on the wire', () => {
    for (const name of ['a..b', 'a'.repeat(64), `${'a'.repeat(60)}.`.repeat(5), 'a b']) {
      assert.throws(() => buildQuery(1, { name, type: 1, class: 1 }), DnsWireError, name);
    }
  });

  it('deframes TCP messages split and joined across reads', () => {
    const msgs = [buildQuery(1, { name: 'a', type: 1, class: 1 }), buildMessage(sample)];
    const stream = Buffer.concat(msgs.map(frameTcp));
    for (const cut of [1, 2, 3, 20, stream.length - 1]) {
      const d = new TcpDeframer();
      const out = [...d.push(stream.subarray(0, cut)), ...d.push(stream.subarray(cut))];
      assert.deepEqual(out, msgs);
      assert.equal(d.buffered, 0);
    }
    const d = new TcpDeframer();
    const out: Buffer[] = [];
    for (let i = 0; i < stream.length; i++) out.push(...d.push(stream.subarray(i, i + 1)));
    assert.deepEqual(out, msgs);
  });
});
