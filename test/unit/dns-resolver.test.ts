import assert from 'node:assert/strict';
import { createSocket } from 'node:dgram';
import { BlockList, connect } from 'node:net';
import { after, before, describe, it } from 'node:test';
import {
  buildMessage,
  buildQuery,
  CLASS_IN,
  type DnsMessage,
  DnsRcode,
  DnsType,
  frameTcp,
  parseMessage,
  TcpDeframer,
} from '../../src/net/dns/dns-wire.js';
import { compileDomainRules } from '../../src/net/dns/domain-rules.js';
import { type ClientPolicy, DnsResolver, type DnsResolverOptions } from '../../src/net/dns/resolver.js';
import { type FakeDns, type FakeRecords, startFakeDns } from '../helpers/fake-dns.js';
import { prng } from '../helpers/prng.js';

const big = Array.from({ length: 300 }, (_, i) => `${i < 150 ? '198.51.100' : '203.0.113'}.${(i % 150) + 1}`);

const records: FakeRecords = {
  'allowed.test': { a: ['93.184.216.34', '93.184.216.35'], ttl: 120 },
  'cached.test': { a: ['93.184.216.36'], ttl: 120 },
  'wild.test': { a: ['93.184.216.40'] },
  'x.wild.test': { a: ['93.184.216.41'] },
  'a.b.wild.test': { a: ['93.184.216.42'] },
  'secret.wild.test': { a: ['93.184.216.43'] },
  'notallowed.test': { a: ['93.184.216.44'] },
  'rebind.test': { a: ['93.184.216.1', '10.0.0.5'] },
  'extra.test': { a: ['93.184.216.200'] },
  'v6.test': { a: ['93.184.216.2'], aaaa: ['2001:db8::2'] },
  'big.test': { a: big },
  'alias.test': { cname: 'target.cdn.test', ttl: 60 },
  'target.cdn.test': { a: ['93.184.216.3'], ttl: 30 },
  'badalias.test': { cname: 'secret.wild.test' },
  'txt.test': { txt: ['hello'] },
};

interface Events {
  answers: { name: string; addresses: string[]; ttl: number }[];
  denied: { name: string; reason: string }[];
}

function policy(events: Events): ClientPolicy {
  return {
    id: 'guest-1',
    allow: compileDomainRules([
      'allowed.test',
      'cached.test',
      '*.wild.test',
      'rebind.test',
      'extra.test',
      'v6.test',
      'big.test',
      'alias.test',
      'badalias.test',
      'txt.test',
      'silent.test',
    ]),
    deny: compileDomainRules(['secret.wild.test']),
    onAnswer: (name, addresses, ttl) => {
      events.answers.push({ name, addresses, ttl });
    },
    onDenied: (e) => events.denied.push(e),
  };
}

async function startResolver(
  o: Partial<DnsResolverOptions> & Pick<DnsResolverOptions, 'upstreams'>,
  events: Events,
): Promise<{ r: DnsResolver; port: number }> {
  const p = policy(events);
  const r = new DnsResolver({
    host: '127.0.0.1',
    port: 0,
    policyFor: (a) => (a === '127.0.0.1' ? p : undefined),
    rateLimit: { perSecond: 1e6, burst: 1e6 },
    ...o,
  });
  const { port } = await r.start();
  return { r, port };
}

async function udpAsk(
  port: number,
  name: string,
  type: number = DnsType.A,
  o: { bind?: string; edns?: number } = {},
): Promise<DnsMessage> {
  const s = createSocket('udp4');
  try {
    await new Promise<void>((r) => s.bind(0, o.bind ?? '127.0.0.1', () => r()));
    const id = Math.floor(Math.random() * 65536);
    const reply = new Promise<DnsMessage>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no answer for ${name}`)), 4000);
      s.on('message', (m) => {
        clearTimeout(t);
        resolve(parseMessage(m));
      });
    });
    s.send(buildQuery(id, { name, type, class: CLASS_IN }, o.edns), port, '127.0.0.1');
    const m = await reply;
    assert.equal(m.header.id, id);
    return m;
  } finally {
    s.close();
  }
}

async function tcpAsk(port: number, names: string[], type: number = DnsType.A): Promise<DnsMessage[]> {
  const s = connect(port, '127.0.0.1');
  const d = new TcpDeframer();
  const out: DnsMessage[] = [];
  try {
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('tcp: no answers')), 4000);
      s.on('error', reject);
      s.on('data', (c: Buffer) => {
        for (const m of d.push(c)) out.push(parseMessage(m));
        if (out.length === names.length) {
          clearTimeout(t);
          resolve();
        }
      });
      // every query in one write: one connection carries several
      s.write(
        Buffer.concat(names.map((n, i) => frameTcp(buildQuery(100 + i, { name: n, type, class: CLASS_IN })))),
      );
    });
  } finally {
    s.destroy();
  }
  return out.sort((a, b) => a.header.id - b.header.id);
}

const addrs = (m: DnsMessage): string[] =>
  m.answers.flatMap((r) => (r.data.kind === 'a' ? [r.data.address] : []));
const asked = (fake: FakeDns, name: string): number => fake.queries.filter((q) => q.name === name).length;

describe('dns resolver', () => {
  let fake: FakeDns;
  let port: number;
  let resolver: DnsResolver;
  const ev: Events = { answers: [], denied: [] };
  const extra = new BlockList();
  extra.addSubnet('93.184.216.128', 25);

  before(async () => {
    fake = await startFakeDns({ records });
    ({ r: resolver, port } = await startResolver(
      { upstreams: [{ host: '127.0.0.1', port: fake.port }], extraDenied: extra },
      ev,
    ));
  });
  after(async () => {
    await resolver.close();
    await fake.close();
  });
  const clear = (): void => {
    ev.answers.length = 0;
    ev.denied.length = 0;
  };

  it('resolves an allowed name and hands its addresses to onAnswer', async () => {
    clear();
    const m = await udpAsk(port, 'Allowed.Test');
    assert.equal(m.header.rcode, DnsRcode.NOERROR);
    assert.equal(m.header.rd, true);
    assert.equal(m.questions[0]?.name, 'Allowed.Test');
    assert.deepEqual(addrs(m).sort(), ['93.184.216.34', '93.184.216.35']);
    assert.deepEqual(ev.answers, [
      { name: 'allowed.test', addresses: ['93.184.216.34', '93.184.216.35'], ttl: 120 },
    ]);
    assert.equal(asked(fake, 'allowed.test'), 1);
  });

  it('answers a repeat from its cache, and still tells onAnswer', async () => {
    clear();
    await udpAsk(port, 'cached.test');
    const m = await udpAsk(port, 'cached.test');
    assert.deepEqual(addrs(m), ['93.184.216.36']);
    assert.equal(asked(fake, 'cached.test'), 1);
    assert.equal(ev.answers.length, 2);
    assert.ok((ev.answers[1]?.ttl ?? 0) <= 120);
  });

  it('answers NXDOMAIN for a name not allowed, and the upstream never sees it', async () => {
    clear();
    for (const name of ['notallowed.test', 'c2VjcmV0IGRhdGE.exfil.example.com']) {
      const m = await udpAsk(port, name);
      assert.equal(m.header.rcode, DnsRcode.NXDOMAIN);
      assert.equal(asked(fake, name.toLowerCase()), 0);
    }
    assert.deepEqual(
      ev.denied.map((d) => d.reason),
      ['not-allowed', 'not-allowed'],
    );
    assert.equal(ev.answers.length, 0);
  });

  it('deny beats allow', async () => {
    clear();
    const m = await udpAsk(port, 'secret.wild.test');
    assert.equal(m.header.rcode, DnsRcode.NXDOMAIN);
    assert.deepEqual(ev.denied, [{ name: 'secret.wild.test', reason: 'denied' }]);
    assert.equal(asked(fake, 'secret.wild.test'), 0);
  });

  it('a wildcard allows any depth below, not the apex', async () => {
    clear();
    assert.deepEqual(addrs(await udpAsk(port, 'x.wild.test')), ['93.184.216.41']);
    assert.deepEqual(addrs(await udpAsk(port, 'a.b.wild.test')), ['93.184.216.42']);
    assert.equal((await udpAsk(port, 'wild.test')).header.rcode, DnsRcode.NXDOMAIN);
    assert.equal(asked(fake, 'wild.test'), 0);
  });

  it('refuses an answer pointing into a denied range (rebinding), always-denied or deployment', async () => {
    clear();
    for (const name of ['rebind.test', 'extra.test']) {
      const m = await udpAsk(port, name);
      assert.equal(m.header.rcode, DnsRcode.NXDOMAIN);
      assert.equal(m.answers.length, 0);
    }
    assert.deepEqual(ev.denied, [
      { name: 'rebind.test', reason: 'private-answer' },
      { name: 'extra.test', reason: 'private-answer' },
    ]);
    assert.equal(ev.answers.length, 0);
    // not cached: asked again, refused again
    assert.equal((await udpAsk(port, 'rebind.test')).header.rcode, DnsRcode.NXDOMAIN);
    assert.equal(asked(fake, 'rebind.test'), 2);
  });

  it('strips AAAA: NOERROR with no data', async () => {
    clear();
    const m = await udpAsk(port, 'v6.test', DnsType.AAAA);
    assert.equal(m.header.rcode, DnsRcode.NOERROR);
    assert.equal(m.answers.length, 0);
    assert.equal(asked(fake, 'v6.test'), 1);
    const a = await udpAsk(port, 'v6.test');
    assert.deepEqual(
      a.answers.map((r) => r.type),
      [DnsType.A],
    );
  });

  it('follows a CNAME chain: onAnswer gets the final addresses and the smallest TTL', async () => {
    clear();
    const m = await udpAsk(port, 'alias.test');
    assert.deepEqual(
      m.answers.map((r) => r.type),
      [DnsType.CNAME, DnsType.A],
    );
    assert.deepEqual(ev.answers, [{ name: 'alias.test', addresses: ['93.184.216.3'], ttl: 30 }]);
    // a chain into a denied name is denied
    clear();
    assert.equal((await udpAsk(port, 'badalias.test')).header.rcode, DnsRcode.NXDOMAIN);
    assert.deepEqual(ev.denied, [{ name: 'secret.wild.test', reason: 'denied' }]);
    assert.equal(ev.answers.length, 0);
  });

  it('refuses an unknown client, forwarding nothing', async () => {
    const before = fake.queries.length;
    const m = await udpAsk(port, 'allowed.test', DnsType.A, { bind: '127.0.0.2' });
    assert.equal(m.header.rcode, DnsRcode.REFUSED);
    assert.equal(fake.queries.length, before);
  });

  it('ANY is refused, HTTPS answered empty, TXT passed through', async () => {
    clear();
    assert.equal((await udpAsk(port, 'allowed.test', DnsType.ANY)).header.rcode, DnsRcode.REFUSED);
    const h = await udpAsk(port, 'allowed.test', DnsType.HTTPS);
    assert.equal(h.header.rcode, DnsRcode.NOERROR);
    assert.equal(h.answers.length, 0);
    const t = await udpAsk(port, 'txt.test', DnsType.TXT);
    assert.deepEqual(t.answers[0]?.data, { kind: 'raw', bytes: Buffer.from('\x05hello') });
  });

  it('serves TCP, several queries on one connection', async () => {
    const [a, b, c] = await tcpAsk(port, ['allowed.test', 'x.wild.test', 'notallowed.test']);
    assert.deepEqual(addrs(a!).sort(), ['93.184.216.34', '93.184.216.35']);
    assert.deepEqual(addrs(b!), ['93.184.216.41']);
    assert.equal(c!.header.rcode, DnsRcode.NXDOMAIN);
  });

  it('truncates a large UDP answer with TC; the retry over TCP gets all of it', async () => {
    clear();
    const u = await udpAsk(port, 'big.test', DnsType.A, { edns: 4096 });
    assert.equal(u.header.tc, true);
    assert.equal(u.answers.length, 0);
    // the resolver itself had to go to the upstream over TCP (its UDP answer was truncated too)
    assert.deepEqual(
      fake.queries.filter((q) => q.name === 'big.test').map((q) => q.transport),
      ['udp', 'tcp'],
    );
    const [t] = await tcpAsk(port, ['big.test']);
    assert.equal(t!.header.tc, false);
    assert.deepEqual(addrs(t!).sort(), [...big].sort());
    assert.equal(ev.answers.at(-1)?.addresses.length, 300);
  });

  it('keeps answering after garbage: random bytes and malicious compression over UDP and TCP', async () => {
    clear();
    const before = fake.queries.length;
    const rnd = prng(53);
    const s = createSocket('udp4');
    await new Promise<void>((r) => s.bind(0, '127.0.0.1', () => r()));
    const evil = [
      Buffer.from([0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1]),
      Buffer.from([0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0x61, 0xc0, 12, 0, 1, 0, 1]),
      Buffer.from([0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 200, 0, 1, 0, 1]),
      Buffer.from([0, 4, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
      Buffer.from([0, 5, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]),
      Buffer.alloc(0),
      Buffer.alloc(3),
    ];
    for (let i = 0; i < 1500; i++) {
      const b = Buffer.alloc(Math.floor(rnd() * 200));
      for (let j = 0; j < b.length; j++) b[j] = Math.floor(rnd() * 256);
      if (b.length > 12 && i % 2) b.writeUInt16BE(1, 4);
      s.send(i < evil.length ? evil[i]! : b, port, '127.0.0.1');
    }
    const t = connect(port, '127.0.0.1');
    t.on('error', () => {});
    t.write(Buffer.concat([...evil.map(frameTcp), Buffer.from([0xff, 0xff, 1, 2, 3])]));
    await new Promise((r) => setTimeout(r, 300));
    s.close();
    t.destroy();
    assert.deepEqual(addrs(await udpAsk(port, 'x.wild.test')), ['93.184.216.41']);
    assert.equal((await tcpAsk(port, ['x.wild.test']))[0]?.header.rcode, DnsRcode.NOERROR);
    // nothing of it was forwarded (random names are not allowed; the cache answered the rest)
    assert.equal(fake.queries.length, before);
  });
});

describe('dns resolver limits and upstream faults', () => {
  it('rate-limits a client: REFUSED and onDenied once the bucket is empty', async () => {
    const ev: Events = { answers: [], denied: [] };
    const fake = await startFakeDns({ records });
    const { r, port } = await startResolver(
      { upstreams: [{ host: '127.0.0.1', port: fake.port }], rateLimit: { perSecond: 1, burst: 5 } },
      ev,
    );
    try {
      const codes: number[] = [];
      for (let i = 0; i < 8; i++) codes.push((await udpAsk(port, 'notallowed.test')).header.rcode);
      assert.deepEqual(codes, [3, 3, 3, 3, 3, 5, 5, 5]);
      assert.equal(ev.denied.filter((d) => d.reason === 'rate-limited').length, 3);
    } finally {
      await r.close();
      await fake.close();
    }
  });

  it('a silent upstream times out to SERVFAIL; the next upstream is tried', async () => {
    const ev: Events = { answers: [], denied: [] };
    const silent = createSocket('udp4');
    await new Promise<void>((r) => silent.bind(0, '127.0.0.1', () => r()));
    const fake = await startFakeDns({ records });
    const dead = { host: '127.0.0.1', port: silent.address().port };
    const one = await startResolver({ upstreams: [dead], upstreamTimeoutMs: 200 }, ev);
    const two = await startResolver(
      { upstreams: [dead, { host: '127.0.0.1', port: fake.port }], upstreamTimeoutMs: 200 },
      ev,
    );
    try {
      const t = performance.now();
      assert.equal((await udpAsk(one.port, 'allowed.test')).header.rcode, DnsRcode.SERVFAIL);
      assert.ok(performance.now() - t < 1500);
      assert.deepEqual(addrs(await udpAsk(two.port, 'x.wild.test')), ['93.184.216.41']);
    } finally {
      await one.r.close();
      await two.r.close();
      await fake.close();
      silent.close();
    }
  });

  it('ignores spoofed upstream answers: wrong id, wrong question, wrong source port', async () => {
    const ev: Events = { answers: [], denied: [] };
    const up = createSocket('udp4');
    const other = createSocket('udp4');
    await new Promise<void>((r) => up.bind(0, '127.0.0.1', () => r()));
    await new Promise<void>((r) => other.bind(0, '127.0.0.1', () => r()));
    const seen: { id: number; from: number }[] = [];
    up.on('message', (buf, rinfo) => {
      const q = parseMessage(buf);
      seen.push({ id: q.header.id, from: rinfo.port });
      const answer = (id: number, name: string, address: string): Buffer =>
        buildMessage({
          header: { ...q.header, id, qr: true, ra: true },
          questions: [{ name, type: DnsType.A, class: CLASS_IN }],
          answers: [{ name, type: DnsType.A, class: CLASS_IN, ttl: 60, data: { kind: 'a', address } }],
        });
      const name = q.questions[0]!.name;
      other.send(answer(q.header.id, name, '93.184.216.66'), rinfo.port, rinfo.address);
      up.send(answer((q.header.id + 1) & 0xffff, name, '93.184.216.67'), rinfo.port, rinfo.address);
      up.send(answer(q.header.id, 'other.test', '93.184.216.68'), rinfo.port, rinfo.address);
      up.send(Buffer.from([1, 2, 3]), rinfo.port, rinfo.address);
      setTimeout(() => up.send(answer(q.header.id, name, '93.184.216.69'), rinfo.port, rinfo.address), 50);
    });
    const { r, port } = await startResolver(
      { upstreams: [{ host: '127.0.0.1', port: up.address().port }] },
      ev,
    );
    try {
      assert.deepEqual(addrs(await udpAsk(port, 'x.wild.test')), ['93.184.216.69']);
      assert.ok(r.stats.ignoredUpstreamPackets >= 4, `ignored ${r.stats.ignoredUpstreamPackets}`);
      assert.deepEqual(ev.answers[0]?.addresses, ['93.184.216.69']);
      // a fresh id and source port per upstream query
      await udpAsk(port, 'a.b.wild.test');
      assert.equal(seen.length, 2);
      assert.notEqual(seen[0]?.from, seen[1]?.from);
    } finally {
      await r.close();
      up.close();
      other.close();
    }
  });

  it('caps TCP connections per client and closes idle ones', async () => {
    const ev: Events = { answers: [], denied: [] };
    const fake = await startFakeDns({ records });
    const { r, port } = await startResolver(
      {
        upstreams: [{ host: '127.0.0.1', port: fake.port }],
        maxTcpConnectionsPerClient: 2,
        tcpIdleTimeoutMs: 300,
      },
      ev,
    );
    const closed = (s: ReturnType<typeof connect>): Promise<number> => {
      const t = performance.now();
      return new Promise((resolve) => s.on('close', () => resolve(performance.now() - t)));
    };
    try {
      const socks = [0, 1, 2].map(() => connect(port, '127.0.0.1').on('error', () => {}));
      const ends = socks.map(closed);
      const third = await ends[2]!;
      assert.ok(third < 250, `third connection closed after ${third}ms`);
      const idle = await ends[0]!;
      assert.ok(idle >= 250, `idle connection closed after ${idle}ms`);
      await ends[1];
    } finally {
      await r.close();
      await fake.close();
    }
  });
});
