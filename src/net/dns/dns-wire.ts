/**
 * DNS messages on the wire (RFC 1035, 3596 for AAAA, 6891 for the OPT record). Both directions
 * carry hostile bytes: queries come from guests, answers from the network. Parsing either
 * returns a whole message or throws DnsWireError; it never reads out of bounds, never follows a
 * compression pointer anywhere but strictly backwards, and its work is bounded by the length
 * of the input.
 */

export const DnsType = {
  A: 1,
  NS: 2,
  CNAME: 5,
  SOA: 6,
  PTR: 12,
  MX: 15,
  TXT: 16,
  AAAA: 28,
  SRV: 33,
  OPT: 41,
  SVCB: 64,
  HTTPS: 65,
  ANY: 255,
} as const;

export const DnsRcode = {
  NOERROR: 0,
  FORMERR: 1,
  SERVFAIL: 2,
  NXDOMAIN: 3,
  NOTIMP: 4,
  REFUSED: 5,
} as const;

export const CLASS_IN = 1;
export const HEADER_SIZE = 12;
export const MAX_LABEL = 63;
/** Wire length of a name, length octets and the root label included (RFC 1035 §2.3.4). */
export const MAX_NAME_WIRE = 255;
/** The largest message TCP's 2-byte length prefix can frame. */
export const MAX_MESSAGE = 65535;
/** UDP payload size of a client that does not speak EDNS (RFC 1035 §4.2.1). */
export const CLASSIC_UDP_SIZE = 512;

export class DnsWireError extends Error {
  override name = 'DnsWireError';
}

export interface DnsHeader {
  id: number;
  qr: boolean;
  opcode: number;
  aa: boolean;
  tc: boolean;
  rd: boolean;
  ra: boolean;
  rcode: number;
}

/** A name is its labels joined by dots, without the trailing dot; the root is ''. */
export interface DnsQuestion {
  name: string;
  type: number;
  class: number;
}

/**
 * Record data, decoded where it holds names: a name inside rdata may be compressed against the
 * message it came in, so it can only be copied into another message decoded and re-encoded.
 */
export type RecordData =
  | { kind: 'a'; address: string }
  | { kind: 'aaaa'; address: string }
  | { kind: 'name'; name: string }
  | { kind: 'mx'; preference: number; exchange: string }
  | { kind: 'srv'; priority: number; weight: number; port: number; target: string }
  | { kind: 'raw'; bytes: Buffer };

export interface DnsRecord {
  name: string;
  type: number;
  /** For OPT this is the sender's UDP payload size, and ttl holds the extended flags. */
  class: number;
  ttl: number;
  data: RecordData;
}

export interface DnsMessage {
  header: DnsHeader;
  questions: DnsQuestion[];
  answers: DnsRecord[];
  authorities: DnsRecord[];
  additionals: DnsRecord[];
}

/** The header alone: enough to answer FORMERR to a message whose body does not parse. */
export function parseHeader(buf: Buffer): DnsHeader {
  if (buf.length < HEADER_SIZE) throw new DnsWireError(`message of ${buf.length} bytes has no header`);
  const flags = buf.readUInt16BE(2);
  return {
    id: buf.readUInt16BE(0),
    qr: (flags & 0x8000) !== 0,
    opcode: (flags >> 11) & 0xf,
    aa: (flags & 0x0400) !== 0,
    tc: (flags & 0x0200) !== 0,
    rd: (flags & 0x0100) !== 0,
    ra: (flags & 0x0080) !== 0,
    rcode: flags & 0xf,
  };
}

function need(buf: Buffer, offset: number, n: number, what: string): void {
  if (offset + n > buf.length) throw new DnsWireError(`truncated ${what} at offset ${offset}`);
}

/**
 * Reads a possibly compressed name at `offset`. A pointer must point before the start of the
 * run of labels it ends (not merely before itself: a pointer back into the labels that lead to
 * it would loop), so every jump strictly lowers that bound and the walk ends.
 */
export function readName(buf: Buffer, offset: number): { name: string; next: number } {
  const labels: string[] = [];
  let wire = 1;
  let pos = offset;
  let bound = offset;
  let next = -1;
  for (;;) {
    need(buf, pos, 1, 'name');
    const len = buf[pos] as number;
    if (len === 0) {
      if (next < 0) next = pos + 1;
      break;
    }
    const kind = len & 0xc0;
    if (kind === 0xc0) {
      need(buf, pos, 2, 'compression pointer');
      const target = buf.readUInt16BE(pos) & 0x3fff;
      if (target >= bound) throw new DnsWireError(`compression pointer at ${pos} does not point backwards`);
      if (next < 0) next = pos + 2;
      bound = target;
      pos = target;
      continue;
    }
    if (kind !== 0) throw new DnsWireError(`label type 0x${kind.toString(16)} at ${pos}`);
    wire += len + 1;
    if (wire > MAX_NAME_WIRE) throw new DnsWireError(`name longer than ${MAX_NAME_WIRE} bytes`);
    need(buf, pos + 1, len, 'label');
    for (let i = pos + 1; i <= pos + len; i++) {
      const c = buf[i] as number;
      // A dot inside a label would read as a label boundary once the name is text, so the name
      // matched against the rules would not be the name queried.
      if (c < 0x21 || c > 0x7e || c === 0x2e)
        throw new DnsWireError(`label byte 0x${c.toString(16)} at ${i}`);
    }
    labels.push(buf.toString('latin1', pos + 1, pos + 1 + len));
    pos += len + 1;
  }
  return { name: labels.join('.'), next };
}

function parseQuestion(buf: Buffer, offset: number): { q: DnsQuestion; next: number } {
  const { name, next } = readName(buf, offset);
  need(buf, next, 4, 'question');
  return { q: { name, type: buf.readUInt16BE(next), class: buf.readUInt16BE(next + 2) }, next: next + 4 };
}

function formatV6(buf: Buffer, at: number): string {
  const groups: number[] = [];
  for (let i = 0; i < 8; i++) groups.push(buf.readUInt16BE(at + i * 2));
  let bestAt = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestAt = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (bestAt < 0) return hex.join(':');
  return `${hex.slice(0, bestAt).join(':')}::${hex.slice(bestAt + bestLen).join(':')}`;
}

function parseRecord(buf: Buffer, offset: number): { r: DnsRecord; next: number } {
  const { name, next: at } = readName(buf, offset);
  need(buf, at, 10, 'record header');
  const type = buf.readUInt16BE(at);
  const klass = buf.readUInt16BE(at + 2);
  const ttl = buf.readUInt32BE(at + 4);
  const rdlength = buf.readUInt16BE(at + 8);
  const start = at + 10;
  const end = start + rdlength;
  need(buf, start, rdlength, 'rdata');
  let data: RecordData;
  const nameIn = (o: number): { name: string; next: number } => {
    const n = readName(buf, o);
    if (n.next > end) throw new DnsWireError(`name in rdata at ${o} overruns its record`);
    return n;
  };
  const exact = (n: number): void => {
    if (n !== end) throw new DnsWireError(`rdata of type ${type} at ${start} has ${end - n} stray bytes`);
  };
  if (klass === CLASS_IN && type === DnsType.A) {
    if (rdlength !== 4) throw new DnsWireError(`A record with ${rdlength} bytes`);
    data = { kind: 'a', address: `${buf[start]}.${buf[start + 1]}.${buf[start + 2]}.${buf[start + 3]}` };
  } else if (klass === CLASS_IN && type === DnsType.AAAA) {
    if (rdlength !== 16) throw new DnsWireError(`AAAA record with ${rdlength} bytes`);
    data = { kind: 'aaaa', address: formatV6(buf, start) };
  } else if (type === DnsType.CNAME || type === DnsType.NS || type === DnsType.PTR) {
    const n = nameIn(start);
    exact(n.next);
    data = { kind: 'name', name: n.name };
  } else if (type === DnsType.MX) {
    if (rdlength < 3) throw new DnsWireError(`MX record with ${rdlength} bytes`);
    const n = nameIn(start + 2);
    exact(n.next);
    data = { kind: 'mx', preference: buf.readUInt16BE(start), exchange: n.name };
  } else if (type === DnsType.SRV) {
    if (rdlength < 7) throw new DnsWireError(`SRV record with ${rdlength} bytes`);
    const n = nameIn(start + 6);
    exact(n.next);
    data = {
      kind: 'srv',
      priority: buf.readUInt16BE(start),
      weight: buf.readUInt16BE(start + 2),
      port: buf.readUInt16BE(start + 4),
      target: n.name,
    };
  } else {
    data = { kind: 'raw', bytes: Buffer.from(buf.subarray(start, end)) };
  }
  return { r: { name, type, class: klass, ttl, data }, next: end };
}

/** A whole message; throws DnsWireError on anything malformed, trailing bytes included. */
export function parseMessage(buf: Buffer): DnsMessage {
  const header = parseHeader(buf);
  const counts = [4, 6, 8, 10].map((o) => buf.readUInt16BE(o)) as [number, number, number, number];
  let pos = HEADER_SIZE;
  const questions: DnsQuestion[] = [];
  for (let i = 0; i < counts[0]; i++) {
    const { q, next } = parseQuestion(buf, pos);
    questions.push(q);
    pos = next;
  }
  const sections: DnsRecord[][] = [[], [], []];
  for (let s = 0; s < 3; s++) {
    for (let i = 0; i < counts[s + 1]!; i++) {
      const { r, next } = parseRecord(buf, pos);
      sections[s]!.push(r);
      pos = next;
    }
  }
  if (pos !== buf.length) throw new DnsWireError(`${buf.length - pos} bytes after the last record`);
  return { header, questions, answers: sections[0]!, authorities: sections[1]!, additionals: sections[2]! };
}

/** A growable buffer with the name compression table of the message being written. */
class Writer {
  buf = Buffer.allocUnsafe(512);
  len = 0;
  private names = new Map<string, number>();

  private room(n: number): void {
    if (this.len + n > MAX_MESSAGE) throw new DnsWireError(`message longer than ${MAX_MESSAGE} bytes`);
    if (this.len + n <= this.buf.length) return;
    const grown = Buffer.allocUnsafe(Math.min(MAX_MESSAGE, Math.max(this.buf.length * 2, this.len + n)));
    this.buf.copy(grown, 0, 0, this.len);
    this.buf = grown;
  }
  u8(v: number): void {
    this.room(1);
    this.buf[this.len++] = v & 0xff;
  }
  u16(v: number): void {
    this.room(2);
    this.buf.writeUInt16BE(v & 0xffff, this.len);
    this.len += 2;
  }
  u32(v: number): void {
    this.room(4);
    this.buf.writeUInt32BE(v >>> 0, this.len);
    this.len += 4;
  }
  bytes(b: Buffer): void {
    this.room(b.length);
    b.copy(this.buf, this.len);
    this.len += b.length;
  }
  name(name: string, compress: boolean): void {
    const labels = splitName(name);
    for (let i = 0; i < labels.length; i++) {
      // Case-sensitive, so a name reads back spelled as written (0x20 case echoes survive).
      const suffix = labels.slice(i).join('.');
      const at = compress ? this.names.get(suffix) : undefined;
      if (at !== undefined) {
        this.u16(0xc000 | at);
        return;
      }
      if (this.len < 0x4000) this.names.set(suffix, this.len);
      const label = labels[i] as string;
      this.u8(label.length);
      this.bytes(Buffer.from(label, 'latin1'));
    }
    this.u8(0);
  }
  done(): Buffer {
    return Buffer.from(this.buf.subarray(0, this.len));
  }
}

/** The labels of a name in text form; throws DnsWireError when it cannot go on the wire. */
export function splitName(name: string): string[] {
  const trimmed = name.endsWith('.') ? name.slice(0, -1) : name;
  if (trimmed === '') return [];
  const labels = trimmed.split('.');
  let wire = 1;
  for (const l of labels) {
    if (l.length === 0 || l.length > MAX_LABEL) throw new DnsWireError(`bad label length in ${name}`);
    if (!/^[\x21-\x7e]+$/.test(l)) throw new DnsWireError(`bad label bytes in ${name}`);
    wire += l.length + 1;
  }
  if (wire > MAX_NAME_WIRE) throw new DnsWireError(`name longer than ${MAX_NAME_WIRE} bytes`);
  return labels;
}

function parseV4(address: string): Buffer {
  const parts = address.split('.');
  if (parts.length !== 4 || !parts.every((p) => /^\d{1,3}$/.test(p) && Number(p) <= 255))
    throw new DnsWireError(`not an IPv4 address: ${address}`);
  return Buffer.from(parts.map(Number));
}

function parseV6(address: string): Buffer {
  const halves = address.split('::');
  if (halves.length > 2) throw new DnsWireError(`not an IPv6 address: ${address}`);
  const groups = (s: string): number[] =>
    s === ''
      ? []
      : s.split(':').map((g) => {
          if (!/^[0-9a-fA-F]{1,4}$/.test(g)) throw new DnsWireError(`not an IPv6 address: ${address}`);
          return Number.parseInt(g, 16);
        });
  const head = groups(halves[0] as string);
  const tail = halves.length === 2 ? groups(halves[1] as string) : [];
  const fill = 8 - head.length - tail.length;
  if (halves.length === 2 ? fill < 1 : fill !== 0) throw new DnsWireError(`not an IPv6 address: ${address}`);
  const all = [...head, ...Array<number>(fill).fill(0), ...tail];
  const out = Buffer.alloc(16);
  all.forEach((g, i) => {
    out.writeUInt16BE(g, i * 2);
  });
  return out;
}

function writeRecord(w: Writer, r: DnsRecord): void {
  w.name(r.name, true);
  w.u16(r.type);
  w.u16(r.class);
  w.u32(r.ttl);
  const lenAt = w.len;
  w.u16(0);
  const d = r.data;
  switch (d.kind) {
    case 'a':
      w.bytes(parseV4(d.address));
      break;
    case 'aaaa':
      w.bytes(parseV6(d.address));
      break;
    case 'name':
      w.name(d.name, true);
      break;
    case 'mx':
      w.u16(d.preference);
      w.name(d.exchange, true);
      break;
    case 'srv':
      // RFC 2782: the target is not compressed.
      w.u16(d.priority);
      w.u16(d.weight);
      w.u16(d.port);
      w.name(d.target, false);
      break;
    case 'raw':
      w.bytes(d.bytes);
      break;
  }
  w.buf.writeUInt16BE(w.len - lenAt - 2, lenAt);
}

export interface MessageInput {
  header: DnsHeader;
  questions: readonly DnsQuestion[];
  answers?: readonly DnsRecord[];
  authorities?: readonly DnsRecord[];
  additionals?: readonly DnsRecord[];
}

/** Encodes a message with name compression; throws DnsWireError if it cannot be encoded. */
export function buildMessage(m: MessageInput): Buffer {
  const w = new Writer();
  const h = m.header;
  const answers = m.answers ?? [];
  const authorities = m.authorities ?? [];
  const additionals = m.additionals ?? [];
  w.u16(h.id);
  w.u16(
    (h.qr ? 0x8000 : 0) |
      ((h.opcode & 0xf) << 11) |
      (h.aa ? 0x0400 : 0) |
      (h.tc ? 0x0200 : 0) |
      (h.rd ? 0x0100 : 0) |
      (h.ra ? 0x0080 : 0) |
      (h.rcode & 0xf),
  );
  for (const n of [m.questions.length, answers.length, authorities.length, additionals.length]) w.u16(n);
  for (const q of m.questions) {
    w.name(q.name, true);
    w.u16(q.type);
    w.u16(q.class);
  }
  for (const r of answers) writeRecord(w, r);
  for (const r of authorities) writeRecord(w, r);
  for (const r of additionals) writeRecord(w, r);
  return w.done();
}

/** A query for one name, recursion desired; with `udpSize`, an EDNS OPT record announcing it. */
export function buildQuery(id: number, question: DnsQuestion, udpSize?: number): Buffer {
  return buildMessage({
    header: { id, qr: false, opcode: 0, aa: false, tc: false, rd: true, ra: false, rcode: 0 },
    questions: [question],
    additionals: udpSize === undefined ? [] : [optRecord(udpSize)],
  });
}

/** The EDNS OPT pseudo-record (RFC 6891): no options, DO bit clear. */
export function optRecord(udpSize: number): DnsRecord {
  return {
    name: '',
    type: DnsType.OPT,
    class: udpSize,
    ttl: 0,
    data: { kind: 'raw', bytes: Buffer.alloc(0) },
  };
}

export interface ReplyOptions {
  answers?: readonly DnsRecord[];
  tc?: boolean;
  aa?: boolean;
  /** Adds an OPT record with this UDP size (answering a client that sent one). */
  udpSize?: number;
}

/**
 * A reply echoing the query's id, opcode, RD bit and question (zero or one, as sent):
 * NXDOMAIN, REFUSED, SERVFAIL, FORMERR, or NOERROR with or without data.
 */
export function buildReply(
  query: { header: DnsHeader; questions: readonly DnsQuestion[] },
  rcode: number,
  o: ReplyOptions = {},
): Buffer {
  return buildMessage({
    header: {
      id: query.header.id,
      qr: true,
      opcode: query.header.opcode,
      aa: o.aa ?? false,
      tc: o.tc ?? false,
      rd: query.header.rd,
      ra: true,
      rcode,
    },
    questions: query.questions.slice(0, 1),
    answers: o.answers ?? [],
    additionals: o.udpSize === undefined ? [] : [optRecord(o.udpSize)],
  });
}

/** TCP framing: the 2-byte length prefix (RFC 1035 §4.2.2). */
export function frameTcp(msg: Buffer): Buffer {
  const out = Buffer.allocUnsafe(msg.length + 2);
  out.writeUInt16BE(msg.length, 0);
  msg.copy(out, 2);
  return out;
}

/**
 * Splits a TCP byte stream into messages. Holds at most one partial message (≤ 64 KiB + 2) plus
 * what the last read brought. Chunks are joined only once a whole message is there, so a peer
 * trickling a byte at a time costs linear work, not a copy of the partial message per byte.
 */
export class TcpDeframer {
  private chunks: Buffer[] = [];
  private total = 0;
  /** Bytes the next message needs in all (its prefix included), once the prefix is known. */
  private need = 2;

  push(chunk: Buffer): Buffer[] {
    this.chunks.push(chunk);
    this.total += chunk.length;
    const out: Buffer[] = [];
    if (this.total < this.need) return out;
    const buf =
      this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks, this.total);
    let pos = 0;
    while (buf.length - pos >= 2) {
      const len = buf.readUInt16BE(pos);
      if (buf.length - pos - 2 < len) break;
      out.push(buf.subarray(pos + 2, pos + 2 + len));
      pos += 2 + len;
    }
    const rest = Buffer.from(buf.subarray(pos));
    this.chunks = rest.length > 0 ? [rest] : [];
    this.total = rest.length;
    this.need = rest.length >= 2 ? rest.readUInt16BE(0) + 2 : 2;
    return out;
  }

  get buffered(): number {
    return this.total;
  }
}
