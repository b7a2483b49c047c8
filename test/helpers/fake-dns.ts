/**
 * A small authoritative DNS server answering from a table, over UDP and TCP, that records every
 * query it receives (so a test can show a denied name never left the resolver). UDP answers
 * larger than the asker's size (512, or its EDNS size) are truncated with TC set, as a real
 * server does. Used by the DNS unit tests, and as a script for a "fake internet" network
 * namespace:
 *
 *   node dist/test/helpers/fake-dns.js --host 198.18.0.53 --port 53 --records records.json
 *
 * records.json: { "pypi.org": { "a": ["151.101.0.223"], "ttl": 60 }, "www.x.org": { "cname": "x.org" } }
 */
import { createSocket } from 'node:dgram';
import { readFileSync } from 'node:fs';
import { createServer, isIPv6, type Socket } from 'node:net';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import {
  buildReply,
  CLASS_IN,
  CLASSIC_UDP_SIZE,
  type DnsMessage,
  DnsRcode,
  type DnsRecord,
  DnsType,
  frameTcp,
  parseMessage,
  TcpDeframer,
} from '../../src/net/dns/dns-wire.js';

export interface FakeRecord {
  a?: string[];
  aaaa?: string[];
  /** Followed through the table, as an authoritative server for every zone would. */
  cname?: string;
  txt?: string[];
  mx?: { preference: number; exchange: string }[];
  /** Seconds; 60 unless given. */
  ttl?: number;
}

/** Name (any case, no trailing dot) → its records. Absent names are NXDOMAIN. */
export type FakeRecords = Record<string, FakeRecord>;

export interface FakeDnsQuery {
  name: string;
  type: number;
  id: number;
  transport: 'udp' | 'tcp';
  /** address:port of the asker. */
  from: string;
}

export interface FakeDns {
  host: string;
  port: number;
  /** Every well-formed query received, in order; names lowercase. */
  queries: FakeDnsQuery[];
  /** The table; tests may change it while the server runs. */
  records: FakeRecords;
  close(): Promise<void>;
}

function txtData(s: string): Buffer {
  const b = Buffer.from(s, 'utf8').subarray(0, 255);
  return Buffer.concat([Buffer.from([b.length]), b]);
}

/** The answer records for a question, following CNAMEs (at most 8). */
export function lookup(
  records: FakeRecords,
  name: string,
  type: number,
): { rcode: number; answers: DnsRecord[] } {
  const table = new Map(Object.entries(records).map(([k, v]) => [k.toLowerCase().replace(/\.$/, ''), v]));
  const answers: DnsRecord[] = [];
  let at = name.toLowerCase();
  let owner = name;
  for (let hop = 0; hop < 8; hop++) {
    const r = table.get(at);
    if (!r) return { rcode: hop === 0 ? DnsRcode.NXDOMAIN : DnsRcode.NOERROR, answers };
    const ttl = r.ttl ?? 60;
    const rr = (t: number, data: DnsRecord['data']): DnsRecord => ({
      name: owner,
      type: t,
      class: CLASS_IN,
      ttl,
      data,
    });
    if (r.cname && type !== DnsType.CNAME) {
      answers.push(rr(DnsType.CNAME, { kind: 'name', name: r.cname }));
      at = r.cname.toLowerCase();
      owner = r.cname;
      continue;
    }
    if (type === DnsType.CNAME && r.cname) answers.push(rr(DnsType.CNAME, { kind: 'name', name: r.cname }));
    if (type === DnsType.A) for (const a of r.a ?? []) answers.push(rr(DnsType.A, { kind: 'a', address: a }));
    if (type === DnsType.AAAA)
      for (const a of r.aaaa ?? []) answers.push(rr(DnsType.AAAA, { kind: 'aaaa', address: a }));
    if (type === DnsType.TXT)
      for (const t of r.txt ?? []) answers.push(rr(DnsType.TXT, { kind: 'raw', bytes: txtData(t) }));
    if (type === DnsType.MX) for (const m of r.mx ?? []) answers.push(rr(DnsType.MX, { kind: 'mx', ...m }));
    break;
  }
  return { rcode: DnsRcode.NOERROR, answers };
}

export async function startFakeDns(o: {
  host?: string;
  port?: number;
  records: FakeRecords;
}): Promise<FakeDns> {
  const host = o.host ?? '127.0.0.1';
  const queries: FakeDnsQuery[] = [];
  const fake: FakeDns = { host, port: 0, queries, records: o.records, close: async () => {} };

  const respond = (buf: Buffer, transport: 'udp' | 'tcp', from: string): Buffer | null => {
    let q: DnsMessage;
    try {
      q = parseMessage(buf);
    } catch {
      return null;
    }
    const question = q.questions[0];
    if (q.header.qr || !question) return null;
    queries.push({
      name: question.name.toLowerCase(),
      type: question.type,
      id: q.header.id,
      transport,
      from,
    });
    const { rcode, answers } = lookup(fake.records, question.name, question.type);
    const opt = q.additionals.find((r) => r.type === DnsType.OPT);
    const out = buildReply(q, rcode, { answers, aa: true, udpSize: opt ? 4096 : undefined });
    const limit = opt ? Math.max(CLASSIC_UDP_SIZE, opt.class) : CLASSIC_UDP_SIZE;
    if (transport === 'udp' && out.length > limit)
      return buildReply(q, rcode, { tc: true, aa: true, udpSize: opt ? 4096 : undefined });
    return out;
  };

  const udp = createSocket({ type: isIPv6(host) ? 'udp6' : 'udp4' });
  udp.on('error', () => {});
  udp.on('message', (buf, rinfo) => {
    const out = respond(buf, 'udp', `${rinfo.address}:${rinfo.port}`);
    if (out) udp.send(out, rinfo.port, rinfo.address);
  });
  await new Promise<void>((resolve, reject) => {
    udp.once('error', reject);
    udp.bind(o.port ?? 0, host, () => resolve());
  });
  fake.port = udp.address().port;

  const conns = new Set<Socket>();
  const tcp = createServer((s) => {
    conns.add(s);
    s.on('close', () => conns.delete(s));
    s.on('error', () => {});
    const d = new TcpDeframer();
    s.on('data', (chunk: Buffer) => {
      for (const m of d.push(chunk)) {
        const out = respond(m, 'tcp', `${s.remoteAddress}:${s.remotePort}`);
        if (out) s.write(frameTcp(out));
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    tcp.once('error', reject);
    tcp.listen(fake.port, host, () => resolve());
  });

  fake.close = async () => {
    for (const c of conns) c.destroy();
    await Promise.all([
      new Promise<void>((r) => udp.close(() => r())),
      new Promise<void>((r) => tcp.close(() => r())),
    ]);
  };
  return fake;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const { values } = parseArgs({
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '53' },
      records: { type: 'string' },
    },
  });
  const records = values.records ? (JSON.parse(readFileSync(values.records, 'utf8')) as FakeRecords) : {};
  const fake = await startFakeDns({ host: values.host, port: Number(values.port), records });
  // One line per query on stdout: the fake internet's test reads which names reached it.
  const push = fake.queries.push.bind(fake.queries);
  fake.queries.push = (...q: FakeDnsQuery[]): number => {
    for (const x of q) console.log(`fake-dns query ${x.name} type ${x.type} from ${x.from}`);
    return push(...q);
  };
  console.log(
    `fake-dns listening on ${fake.host}:${fake.port} (udp+tcp), ${Object.keys(records).length} names`,
  );
  const stop = (): void => {
    fake.close().then(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}
