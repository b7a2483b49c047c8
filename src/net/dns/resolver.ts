/**
 * The guests' resolver: the only DNS server a guest can reach (the firewall sends every guest
 * packet for port 53 here). A name is matched against its client's rules before anything leaves
 * the host, so a name a guest may not resolve never reaches an upstream, whatever it encodes.
 * Answers are screened too: an address in an always-denied range refuses the whole answer (DNS
 * rebinding), AAAA records are dropped (guests have no IPv6 route), and the addresses of an
 * allowed answer are handed to `onAnswer` so the firewall can open exactly those. See docs/dns.md.
 */
import { randomInt } from 'node:crypto';
import { createSocket, type RemoteInfo, type Socket as UdpSocket } from 'node:dgram';
import {
  type BlockList,
  createServer,
  isIP,
  isIPv6,
  type Server,
  type Socket,
  connect as tcpConnect,
} from 'node:net';
import { isAlwaysDenied } from '../ranges.js';
import {
  buildQuery,
  buildReply,
  CLASS_IN,
  CLASSIC_UDP_SIZE,
  type DnsMessage,
  type DnsQuestion,
  DnsRcode,
  type DnsRecord,
  DnsType,
  frameTcp,
  parseHeader,
  parseMessage,
  TcpDeframer,
} from './dns-wire.js';
import { type DomainRules, normalizeDomain } from './domain-rules.js';

export type DeniedReason = 'not-allowed' | 'denied' | 'private-answer' | 'rate-limited' | 'bad-query';

/** What the resolver asks about a client (a guest, by its address) for each query. */
export interface ClientPolicy {
  id: string;
  /** null: any name. */
  allow: DomainRules | null;
  deny: DomainRules;
  /**
   * Called before the answer is sent, with the answer's A addresses and its smallest TTL; the
   * answer waits for a returned promise (the firewall opening the addresses), so a guest never
   * connects to an address its answer named before it is open.
   */
  onAnswer(name: string, addresses: string[], ttlSeconds: number): void | Promise<void>;
  onDenied(event: { name: string; reason: DeniedReason }): void;
}

export interface Upstream {
  /** An IP address: answers are accepted only from exactly this address and port. */
  host: string;
  port: number;
}

export interface DnsResolverOptions {
  host: string;
  /** 0: any free port. */
  port: number;
  upstreams: readonly Upstream[];
  policyFor(clientAddress: string): ClientPolicy | undefined;
  /** Deployment ranges refused in answers on top of the always-denied ones. */
  extraDenied?: BlockList;
  /** Per upstream, per attempt (UDP, then TCP if truncated). */
  upstreamTimeoutMs?: number;
  rateLimit?: { perSecond: number; burst: number };
  maxInFlight?: number;
  maxInFlightPerClient?: number;
  maxTcpConnections?: number;
  maxTcpConnectionsPerClient?: number;
  tcpIdleTimeoutMs?: number;
  /** Queries one TCP connection may have unanswered before the resolver stops reading it. */
  maxTcpPipeline?: number;
  /** Positive answers cached (shared by clients; policy is checked per query). 0: no cache. */
  cacheEntries?: number;
  maxCacheTtlSeconds?: number;
  /** The largest UDP reply sent to a client whatever it announces (EDNS). */
  maxUdpReply?: number;
  log?: (line: string) => void;
}

export const dnsResolverDefaults = {
  upstreamTimeoutMs: 2000,
  rateLimit: { perSecond: 200, burst: 400 },
  maxInFlight: 1024,
  maxInFlightPerClient: 64,
  maxTcpConnections: 256,
  maxTcpConnectionsPerClient: 16,
  tcpIdleTimeoutMs: 10_000,
  maxTcpPipeline: 32,
  cacheEntries: 10_000,
  maxCacheTtlSeconds: 300,
  maxUdpReply: 4096,
} as const;

/** Counters for tests and the operator's view; they only ever grow. */
export interface DnsResolverStats {
  queries: number;
  forwarded: number;
  cacheHits: number;
  /** Upstream datagrams dropped: wrong source, id or question, or unparsable. */
  ignoredUpstreamPackets: number;
  upstreamFailures: number;
  truncated: number;
}

/** Upstream asks more than this many CNAME hops deep get no further. */
const MAX_CHAIN = 16;
/** The UDP size announced to upstreams. */
const UPSTREAM_UDP_SIZE = 4096;
/** Types forwarded for an allowed name; the rest get a local answer. */
const FORWARDED = new Set<number>([
  DnsType.A,
  DnsType.AAAA,
  DnsType.CNAME,
  DnsType.TXT,
  DnsType.MX,
  DnsType.SRV,
]);

interface Screened {
  rcode: number;
  records: DnsRecord[];
  /** The query name then each CNAME target, lowercase. */
  chain: string[];
  addresses: string[];
  ttl: number;
}

interface CacheEntry {
  screened: Screened;
  expiresAt: number;
}

class TokenBucket {
  tokens: number;
  last: number;
  constructor(burst: number, now: number) {
    this.tokens = burst;
    this.last = now;
  }
  refill(now: number, perSecond: number, burst: number): void {
    this.tokens = Math.min(burst, this.tokens + ((now - this.last) / 1000) * perSecond);
    this.last = now;
  }
}

function plainAddress(a: string): string {
  return a.startsWith('::ffff:') && a.includes('.') ? a.slice(7) : a;
}

export class DnsResolver {
  readonly stats: DnsResolverStats = {
    queries: 0,
    forwarded: 0,
    cacheHits: 0,
    ignoredUpstreamPackets: 0,
    upstreamFailures: 0,
    truncated: 0,
  };
  private readonly o: DnsResolverOptions & typeof dnsResolverDefaults;
  private udp: UdpSocket | null = null;
  private tcp: Server | null = null;
  private closed = false;
  private readonly connections = new Set<Socket>();
  private readonly connectionsPer = new Map<string, number>();
  private readonly upstreamSockets = new Set<UdpSocket | Socket>();
  private readonly buckets = new Map<string, TokenBucket>();
  private inFlight = 0;
  private readonly inFlightPer = new Map<string, number>();
  private readonly cache = new Map<string, CacheEntry>();

  constructor(options: DnsResolverOptions) {
    this.o = { ...dnsResolverDefaults, ...options } as DnsResolverOptions & typeof dnsResolverDefaults;
    if (options.upstreams.length === 0) throw new Error('the DNS resolver needs at least one upstream');
    for (const u of options.upstreams) {
      if (!isIP(u.host)) throw new Error(`DNS upstream ${u.host} is not an IP address`);
    }
  }

  async start(): Promise<{ port: number }> {
    const udp = createSocket({ type: isIPv6(this.o.host) ? 'udp6' : 'udp4' });
    this.udp = udp;
    udp.on('error', (err) => this.o.log?.(`dns: udp: ${err.message}`));
    udp.on('message', (msg, rinfo) => this.onDatagram(udp, msg, rinfo));
    await new Promise<void>((resolve, reject) => {
      udp.once('error', reject);
      udp.bind(this.o.port, this.o.host, () => {
        udp.off('error', reject);
        resolve();
      });
    });
    const port = udp.address().port;
    const tcp = createServer((s) => this.onConnection(s));
    this.tcp = tcp;
    tcp.maxConnections = this.o.maxTcpConnections;
    tcp.on('error', (err) => this.o.log?.(`dns: tcp: ${err.message}`));
    await new Promise<void>((resolve, reject) => {
      tcp.once('error', reject);
      tcp.listen(port, this.o.host, () => {
        tcp.off('error', reject);
        resolve();
      });
    });
    return { port };
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const s of this.upstreamSockets) closeQuietly(s);
    for (const c of this.connections) c.destroy();
    const udp = this.udp;
    const tcp = this.tcp;
    this.udp = null;
    this.tcp = null;
    await Promise.all([
      udp ? new Promise<void>((r) => udp.close(() => r())) : undefined,
      tcp ? new Promise<void>((r) => tcp.close(() => r())) : undefined,
    ]);
  }

  private onDatagram(udp: UdpSocket, msg: Buffer, rinfo: RemoteInfo): void {
    this.answer(msg, plainAddress(rinfo.address), 'udp').then(
      (reply) => {
        if (reply && !this.closed) udp.send(reply, rinfo.port, rinfo.address);
      },
      (err: unknown) => this.o.log?.(`dns: bug answering ${rinfo.address}: ${String(err)}`),
    );
  }

  private onConnection(s: Socket): void {
    const client = plainAddress(s.remoteAddress ?? '');
    const count = (this.connectionsPer.get(client) ?? 0) + 1;
    if (this.closed || count > this.o.maxTcpConnectionsPerClient) {
      s.destroy();
      return;
    }
    this.connectionsPer.set(client, count);
    this.connections.add(s);
    s.on('close', () => {
      this.connections.delete(s);
      const n = (this.connectionsPer.get(client) ?? 1) - 1;
      if (n <= 0) this.connectionsPer.delete(client);
      else this.connectionsPer.set(client, n);
    });
    s.on('error', () => {});
    s.setTimeout(this.o.tcpIdleTimeoutMs, () => s.destroy());
    const deframer = new TcpDeframer();
    let pending = 0;
    // Reading stops while the guest has too many queries unanswered or does not read its
    // answers, so a connection holds a bounded amount of memory.
    const flow = (): void => {
      if (pending < this.o.maxTcpPipeline && s.writableLength < 65536) s.resume();
      else s.pause();
    };
    s.on('drain', flow);
    s.on('data', (chunk: Buffer) => {
      for (const msg of deframer.push(chunk)) {
        pending++;
        this.answer(msg, client, 'tcp').then(
          (reply) => {
            pending--;
            if (reply && !s.destroyed) s.write(frameTcp(reply));
            flow();
          },
          (err: unknown) => {
            pending--;
            this.o.log?.(`dns: bug answering ${client}: ${String(err)}`);
            s.destroy();
          },
        );
      }
      flow();
    });
  }

  /** The reply to one message from `client`, or null to send nothing. Never throws on input. */
  private async answer(msg: Buffer, client: string, transport: 'udp' | 'tcp'): Promise<Buffer | null> {
    this.stats.queries++;
    let header: ReturnType<typeof parseHeader>;
    try {
      header = parseHeader(msg);
    } catch {
      return null;
    }
    // A response sent to the resolver is never answered: two resolvers must not ping-pong.
    if (header.qr) return null;
    let policy: ClientPolicy | undefined;
    try {
      policy = this.o.policyFor(client);
    } catch (err) {
      this.o.log?.(`dns: policy for ${client}: ${String(err)}`);
      return null;
    }
    const bare = { header, questions: [] as DnsQuestion[] };
    let query: DnsMessage | null = null;
    try {
      query = parseMessage(msg);
    } catch {}
    if (!policy) return buildReply(query ?? bare, DnsRcode.REFUSED);
    const denied = (name: string, reason: DeniedReason): void => {
      try {
        policy.onDenied({ name, reason });
      } catch (err) {
        this.o.log?.(`dns: onDenied for ${policy.id}: ${String(err)}`);
      }
    };
    if (!this.take(policy.id)) {
      denied(query?.questions[0]?.name.toLowerCase() ?? '', 'rate-limited');
      return buildReply(query ?? bare, DnsRcode.REFUSED);
    }
    if (!query) {
      denied('', 'bad-query');
      return buildReply(bare, DnsRcode.FORMERR);
    }
    if (header.opcode !== 0) return buildReply(query, DnsRcode.NOTIMP);
    const q = query.questions[0];
    if (!q || query.questions.length !== 1) {
      denied('', 'bad-query');
      return buildReply(query, DnsRcode.FORMERR);
    }
    const name = normalizeDomain(q.name);
    if (name === null || q.class !== CLASS_IN) {
      denied(q.name.toLowerCase(), 'bad-query');
      return buildReply(query, DnsRcode.REFUSED);
    }
    const opt = query.additionals.find((r) => r.type === DnsType.OPT);
    const udpSize = opt ? Math.max(CLASSIC_UDP_SIZE, Math.min(opt.class, this.o.maxUdpReply)) : undefined;
    const reply = (rcode: number, answers: DnsRecord[] = []): Buffer => {
      let out = buildReply(query, rcode, { answers, udpSize });
      if (transport === 'udp' && out.length > (udpSize ?? CLASSIC_UDP_SIZE)) {
        this.stats.truncated++;
        out = buildReply(query, rcode, { tc: true, udpSize });
      }
      return out;
    };
    if (policy.deny.matches(name)) {
      denied(name, 'denied');
      return reply(DnsRcode.NXDOMAIN);
    }
    if (policy.allow && !policy.allow.matches(name)) {
      denied(name, 'not-allowed');
      return reply(DnsRcode.NXDOMAIN);
    }
    if (q.type === DnsType.ANY) {
      denied(name, 'bad-query');
      return reply(DnsRcode.REFUSED);
    }
    // No SVCB/HTTPS data: its address hints would bypass the A screening and onAnswer; an
    // empty answer makes clients fall back to A at once.
    if (q.type === DnsType.HTTPS || q.type === DnsType.SVCB) return reply(DnsRcode.NOERROR);
    if (!FORWARDED.has(q.type)) {
      denied(name, 'bad-query');
      return reply(DnsRcode.REFUSED);
    }

    const key = `${q.type}/${name}`;
    let screened: Screened | 'private' | null;
    const hit = this.cache.get(key);
    const now = Date.now();
    if (hit && hit.expiresAt > now) {
      this.stats.cacheHits++;
      const ttl = Math.max(1, Math.floor((hit.expiresAt - now) / 1000));
      screened = { ...hit.screened, ttl, records: hit.screened.records.map((r) => ({ ...r, ttl })) };
    } else {
      if (hit) this.cache.delete(key);
      const perClient = this.inFlightPer.get(policy.id) ?? 0;
      if (perClient >= this.o.maxInFlightPerClient) {
        denied(name, 'rate-limited');
        return reply(DnsRcode.REFUSED);
      }
      if (this.inFlight >= this.o.maxInFlight) return reply(DnsRcode.SERVFAIL);
      this.inFlight++;
      this.inFlightPer.set(policy.id, perClient + 1);
      try {
        screened = await this.resolve(name, q.type);
      } finally {
        this.inFlight--;
        const n = (this.inFlightPer.get(policy.id) ?? 1) - 1;
        if (n <= 0) this.inFlightPer.delete(policy.id);
        else this.inFlightPer.set(policy.id, n);
      }
      if (screened && screened !== 'private') this.remember(key, screened);
    }
    if (this.closed) return null;
    if (screened === null) return reply(DnsRcode.SERVFAIL);
    if (screened === 'private') {
      denied(name, 'private-answer');
      return reply(DnsRcode.NXDOMAIN);
    }
    for (const n of screened.chain.slice(1)) {
      if (policy.deny.matches(n)) {
        denied(n, 'denied');
        return reply(DnsRcode.NXDOMAIN);
      }
    }
    if (screened.addresses.length > 0) {
      try {
        await policy.onAnswer(name, [...screened.addresses], screened.ttl);
      } catch (err) {
        // The firewall may not have opened these addresses: better no answer than a wrong one.
        this.o.log?.(`dns: onAnswer for ${policy.id}: ${String(err)}`);
        return reply(DnsRcode.SERVFAIL);
      }
    }
    // The question is echoed as the guest spelled it, so the owner names follow it.
    const records = screened.records.map((r) => (r.name.toLowerCase() === name ? { ...r, name: q.name } : r));
    return reply(screened.rcode, records);
  }

  private take(id: string): boolean {
    const { perSecond, burst } = this.o.rateLimit;
    const now = performance.now();
    let b = this.buckets.get(id);
    if (!b) {
      if (this.buckets.size >= 4096) {
        for (const [k, v] of this.buckets) {
          v.refill(now, perSecond, burst);
          if (v.tokens >= burst) this.buckets.delete(k);
        }
      }
      b = new TokenBucket(burst, now);
      this.buckets.set(id, b);
    } else b.refill(now, perSecond, burst);
    if (b.tokens < 1) return false;
    b.tokens--;
    return true;
  }

  private remember(key: string, s: Screened): void {
    const ttl = Math.min(s.ttl, this.o.maxCacheTtlSeconds);
    if (this.o.cacheEntries <= 0 || ttl <= 0 || s.records.length === 0) return;
    if (this.cache.size >= this.o.cacheEntries) {
      const oldest = this.cache.keys().next();
      if (!oldest.done) this.cache.delete(oldest.value);
    }
    this.cache.set(key, { screened: s, expiresAt: Date.now() + ttl * 1000 });
  }

  /** Asks each upstream in turn; null when none gave a usable answer. */
  private async resolve(name: string, type: number): Promise<Screened | 'private' | null> {
    this.stats.forwarded++;
    const question = { name, type, class: CLASS_IN };
    for (const u of this.o.upstreams) {
      if (this.closed) return null;
      const m = await this.ask(u, question);
      if (m && (m.header.rcode === DnsRcode.NOERROR || m.header.rcode === DnsRcode.NXDOMAIN)) {
        return this.screen(name, type, m);
      }
      this.stats.upstreamFailures++;
    }
    return null;
  }

  private screen(name: string, type: number, m: DnsMessage): Screened | 'private' {
    // Any address in a denied range refuses the whole answer, whoever owns the record: a
    // partial answer would still tell the guest the name leads inside.
    for (const r of m.answers) {
      if (r.data.kind === 'a' && isAlwaysDenied(r.data.address, this.o.extraDenied)) return 'private';
    }
    const chain = [name];
    for (let hop = 0; hop < MAX_CHAIN; hop++) {
      const at = chain[chain.length - 1];
      const c = m.answers.find((r) => r.type === DnsType.CNAME && r.name.toLowerCase() === at);
      if (c?.data.kind !== 'name') break;
      const target = c.data.name.toLowerCase();
      if (chain.includes(target)) break;
      chain.push(target);
    }
    const owners = new Set(chain);
    // Only records about the chain are kept: anything else an upstream adds is unasked for.
    const records = m.answers.filter(
      (r) =>
        r.class === CLASS_IN &&
        owners.has(r.name.toLowerCase()) &&
        r.type !== DnsType.AAAA &&
        (r.type === DnsType.CNAME || r.type === type),
    );
    const addresses = records.flatMap((r) => (r.data.kind === 'a' ? [r.data.address] : []));
    const ttl = records.length === 0 ? 0 : Math.min(...records.map((r) => r.ttl));
    return { rcode: m.header.rcode, records, chain, addresses: [...new Set(addresses)], ttl };
  }

  /**
   * One upstream exchange: a fresh socket (so a fresh random source port) and a random id per
   * query; a datagram counts only if it comes from the upstream's address and port and carries
   * the id and the question asked. Truncated answers are asked again over TCP.
   */
  private async ask(u: Upstream, question: DnsQuestion): Promise<DnsMessage | null> {
    const id = randomInt(65536);
    const query = buildQuery(id, question, UPSTREAM_UDP_SIZE);
    const matches = (buf: Buffer): DnsMessage | null => {
      let m: DnsMessage;
      try {
        m = parseMessage(buf);
      } catch {
        return null;
      }
      const q = m.questions[0];
      if (!m.header.qr || m.header.id !== id || m.questions.length !== 1 || !q) return null;
      if (q.name.toLowerCase() !== question.name || q.type !== question.type || q.class !== question.class)
        return null;
      return m;
    };
    const viaUdp = await new Promise<DnsMessage | 'tc' | null>((resolve) => {
      const s = createSocket({ type: isIPv6(u.host) ? 'udp6' : 'udp4' });
      this.upstreamSockets.add(s);
      let settled = false;
      const done = (v: DnsMessage | 'tc' | null): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.upstreamSockets.delete(s);
        closeQuietly(s);
        resolve(v);
      };
      const timer = setTimeout(() => done(null), this.o.upstreamTimeoutMs);
      s.on('error', () => done(null));
      s.on('close', () => done(null));
      s.on('message', (buf, rinfo) => {
        const m = plainAddress(rinfo.address) === u.host && rinfo.port === u.port ? matches(buf) : null;
        if (!m) {
          this.stats.ignoredUpstreamPackets++;
          return;
        }
        done(m.header.tc ? 'tc' : m);
      });
      s.bind(0, () => s.send(query, u.port, u.host));
    });
    if (viaUdp !== 'tc') return viaUdp;
    return new Promise<DnsMessage | null>((resolve) => {
      const s = tcpConnect(u.port, u.host);
      this.upstreamSockets.add(s);
      const deframer = new TcpDeframer();
      let settled = false;
      const done = (v: DnsMessage | null): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.upstreamSockets.delete(s);
        s.destroy();
        resolve(v);
      };
      const timer = setTimeout(() => done(null), this.o.upstreamTimeoutMs);
      s.on('error', () => done(null));
      s.on('close', () => done(null));
      s.on('connect', () => s.write(frameTcp(query)));
      s.on('data', (chunk: Buffer) => {
        for (const buf of deframer.push(chunk)) {
          const m = matches(buf);
          if (m) return done(m);
          this.stats.ignoredUpstreamPackets++;
        }
      });
    });
  }
}

function closeQuietly(s: UdpSocket | Socket): void {
  try {
    if ('destroy' in s) s.destroy();
    else s.close();
  } catch {}
}
