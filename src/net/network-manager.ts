import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Log } from '../background.js';
import { HutchError } from '../errors.js';
import { daemonTag, inside, netnsName, nsLink, type Outside, outsideOf, slotsIn } from './addressing.js';
import { NetDirectory } from './directory.js';
import { type EgressRules, egressView, noEgressRules } from './egress.js';
import {
  type DenialReason,
  denialReasons,
  egressUpdate,
  hostRuleset,
  type NsFirewall,
  nsRuleset,
  resolverUpdate,
} from './firewall.js';
import { inNetns, run } from './host-commands.js';
import type { NetStore } from './net-store.js';
import { SlotTable } from './slots.js';

export interface NetSettings {
  stateDir: string;
  /** The outside pool every guest namespace's link takes a /30 of. */
  pool: string;
  uplink: string;
  maxConnections: number;
  bytesPerSecond: number;
  /** Host-wide directory of taken slots (shared by every daemon). */
  slotDir: string;
  publicDomain?: string | undefined;
}

/** One machine's network: its namespace and outside addressing. */
export interface MachineNet {
  machineId: string;
  netns: string;
  outside: Outside;
  /** The user network it is on (its members reach each other); none for snapshot machines. */
  networkId?: string;
  /** Addresses opened in its `resolved` set, and until when (ms): writes already made are skipped. */
  resolved: Map<string, number>;
}

/** A refused destination, most recent first (GET /v1/machines/{id}/egress). */
export interface Denial {
  reason: DenialReason | 'dns';
  destination: string;
  protocol?: string;
  port?: number;
  name?: string;
  /** Why the resolver refused the name: not-allowed, denied, private-answer, rate-limited, bad-query. */
  detail?: string;
  count: number;
  last_seen: string;
}

const netFile = 'net.json';

/**
 * Guest networks: a namespace per running machine (created before its QEMU, removed after it)
 * holding the tap the guest's NIC is plugged into, the link to the host and the machine's
 * firewall; the host's table per daemon; the egress rules (net.db) and what they refused.
 */
export class NetworkManager {
  readonly tag: string;
  private readonly slots: SlotTable;
  private readonly byNsAddr = new Map<string, MachineNet>();
  private readonly byId = new Map<string, MachineNet>();
  private readonly dnsDenials = new Map<string, Denial[]>();
  private readonly rules = new Map<string, EgressRules>();
  /** Running members of each user network. */
  private readonly members = new Map<string, Set<MachineNet>>();
  readonly directory: NetDirectory;
  private dnsPort = 0;
  /** The host's own IPv4 addresses: refused in every namespace (counted there; the host table also refuses them). */
  private hostAddrs: string[] = [];

  constructor(
    private readonly s: NetSettings,
    private readonly store: NetStore,
    private readonly log: Log,
  ) {
    this.tag = daemonTag(s.stateDir);
    this.slots = new SlotTable(s.slotDir, slotsIn(s.pool));
    this.directory = new NetDirectory(store, s.pool, s.publicDomain);
  }

  /** Host setup: forwarding on, the daemon's host table (guests reach the host only at `dnsPort`). */
  async start(dnsPort: number): Promise<void> {
    this.dnsPort = dnsPort;
    const addrs = JSON.parse(await run('ip', ['-j', '-4', 'addr', 'show'])) as {
      addr_info?: { local?: string }[];
    }[];
    this.hostAddrs = addrs
      .flatMap((l) => (l.addr_info ?? []).map((a) => a.local ?? ''))
      .filter((a) => a !== '');
    writeFileSync('/proc/sys/net/ipv4/ip_forward', '1');
    await run(
      'nft',
      ['-f', '-'],
      hostRuleset({ tag: this.tag, pool: this.s.pool, dnsPort, uplink: this.s.uplink }),
    );
  }

  /** Removes the daemon's host table (a clean shutdown with no networked machine left). */
  async stopHost(): Promise<void> {
    await run('nft', ['delete', 'table', 'inet', `hutch-${this.tag}`]).catch(() => {});
  }

  /** The machine a resolver client address (a namespace's outside address) belongs to. */
  machineAt(address: string): MachineNet | undefined {
    return this.byNsAddr.get(address);
  }

  /** How many machines have a namespace now. */
  attached(): number {
    return this.byId.size;
  }

  netOf(machineId: string): MachineNet | undefined {
    return this.byId.get(machineId);
  }

  private firewall(net: MachineNet): NsFirewall {
    return {
      hostAddr: net.outside.host,
      nsAddr: net.outside.ns,
      dnsPort: this.dnsPort,
      maxConnections: this.s.maxConnections,
      bytesPerSecond: this.s.bytesPerSecond,
      hostAddrs: this.hostAddrs,
    };
  }

  /**
   * Makes a machine's namespace, link, tap and firewall. Fresh outside addressing each time (a
   * restored or resumed guest is a new flow to the world). Undone by `detach` even half-made.
   */
  async attach(machineId: string, runDir: string, owner?: string): Promise<MachineNet> {
    if (!this.dnsPort) throw new HutchError('INTERNAL', 'guest networking is not started on this daemon');
    const netns = netnsName(this.tag, machineId);
    const slot = this.slots.take(netns);
    const networkId = owner === undefined ? undefined : this.directory.networkOf(machineId, owner);
    const net: MachineNet = {
      machineId,
      netns,
      outside: outsideOf(this.s.pool, this.tag, slot),
      ...(networkId ? { networkId } : {}),
      resolved: new Map(),
    };
    writeNetFile(runDir, net);
    this.remember(net);
    try {
      const o = net.outside;
      // A namespace of the same name left by a crash (its machine is being made again) goes first.
      if (existsSync(`/run/netns/${netns}`)) await run('ip', ['netns', 'del', netns]).catch(() => {});
      await run(
        'ip',
        ['-batch', '-'],
        [
          `netns add ${netns}`,
          `link add ${o.hostLink} type veth peer name ${nsLink} netns ${netns}`,
          `addr add ${o.host}/30 dev ${o.hostLink}`,
          `link set ${o.hostLink} up`,
        ].join('\n'),
      );
      await run(
        'ip',
        ['-netns', netns, '-batch', '-'],
        [
          'link set lo up',
          `addr add ${o.ns}/30 dev ${nsLink}`,
          `link set ${nsLink} up`,
          `route add default via ${o.host}`,
          `tuntap add ${inside.tap} mode tap`,
          `link set ${inside.tap} address ${inside.tapMac} mtu ${inside.mtu} up`,
          `addr add ${inside.gateway}/${inside.prefix} dev ${inside.tap}`,
        ].join('\n'),
      );
      const rules = this.rulesOf(machineId);
      await inNetns(
        netns,
        'sh',
        [
          '-c',
          'echo 1 > /proc/sys/net/ipv4/ip_forward && echo 0 > /proc/sys/net/ipv4/conf/all/route_localnet && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && exec nft -f -',
        ],
        nsRuleset(this.firewall(net), rules),
      );
      await this.join(net);
      return net;
    } catch (e) {
      await this.detach(net);
      throw new HutchError(
        'BOOT_FAILED',
        `the machine's network could not be set up: ${(e as Error).message}`,
      );
    }
  }

  /**
   * Gives a pooled machine's network (attached for no one, its guest paused since) to the user it
   * is handed to: their egress rules applied, then onto their network (the one it was put on, else
   * their default). Before its guest runs again, so its first packet already meets its own rules.
   */
  async handTo(machineId: string, runDir: string, owner: string, rules: EgressRules): Promise<void> {
    const net = this.byId.get(machineId);
    if (!net) throw new HutchError('INTERNAL', `machine ${machineId} has no network to hand out`);
    await this.setRules(machineId, rules);
    net.networkId = this.directory.networkOf(machineId, owner);
    writeNetFile(runDir, net);
    await this.join(net);
  }

  /** The network of a machine found running after a restart (its QEMU still in the namespace). */
  adopt(machineId: string, runDir: string): MachineNet | undefined {
    try {
      const f = JSON.parse(readFileSync(join(runDir, netFile), 'utf8')) as {
        netns: string;
        slot: number;
        networkId?: string;
      };
      if (!existsSync(`/run/netns/${f.netns}`)) return undefined;
      const net: MachineNet = {
        machineId,
        netns: f.netns,
        outside: outsideOf(this.s.pool, this.tag, f.slot),
        ...(f.networkId ? { networkId: f.networkId } : {}),
        // Unknown after a restart: the next answers write their addresses again.
        resolved: new Map(),
      };
      this.remember(net);
      // Its peers are set again once every survivor is adopted (sweep): some may have died.
      if (net.networkId) this.membersOf(net.networkId).add(net);
      // Its DNS goes to this daemon's resolver (on another port when the last one was taken).
      inNetns(
        net.netns,
        'nft',
        ['-f', '-'],
        resolverUpdate(this.firewall(net), this.rulesOf(machineId)),
      ).catch((e: unknown) =>
        this.log('warn', 'adopted network not pointed at the resolver', {
          id: machineId,
          error: (e as Error).message,
        }),
      );
      return net;
    } catch {
      return undefined;
    }
  }

  private remember(net: MachineNet): void {
    this.byId.set(net.machineId, net);
    this.byNsAddr.set(net.outside.ns, net);
  }

  private membersOf(networkId: string): Set<MachineNet> {
    let m = this.members.get(networkId);
    if (!m) {
      m = new Set();
      this.members.set(networkId, m);
    }
    return m;
  }

  /** Adds a machine to its network: it and every running member may now reach each other. */
  private async join(net: MachineNet): Promise<void> {
    if (!net.networkId) return;
    const members = this.membersOf(net.networkId);
    const others = [...members];
    members.add(net);
    if (!others.length) return;
    await inNetns(
      net.netns,
      'nft',
      ['-f', '-'],
      `add element ip hutch peers { ${others.map((o) => o.outside.ns).join(', ')} }\n`,
    );
    await Promise.all(
      others.map((o) =>
        inNetns(o.netns, 'nft', ['-f', '-'], `add element ip hutch peers { ${net.outside.ns} }\n`).catch(
          () => {},
        ),
      ),
    );
  }

  /** Takes a machine off its network: its address leaves every member's set (it may be reused). */
  private async leave(net: MachineNet): Promise<void> {
    if (!net.networkId) return;
    const members = this.membersOf(net.networkId);
    members.delete(net);
    await Promise.all(
      [...members].map((o) =>
        inNetns(o.netns, 'nft', ['-f', '-'], `delete element ip hutch peers { ${net.outside.ns} }\n`).catch(
          () => {},
        ),
      ),
    );
  }

  /** Sets every member's peers to exactly the running members (after a restart some are gone). */
  private async resetPeers(): Promise<void> {
    for (const members of this.members.values())
      for (const m of members) {
        const others = [...members].filter((o) => o !== m).map((o) => o.outside.ns);
        const add = others.length ? `add element ip hutch peers { ${others.join(', ')} }\n` : '';
        await inNetns(m.netns, 'nft', ['-f', '-'], `flush set ip hutch peers\n${add}`).catch((e: unknown) =>
          this.log('warn', 'network peers not reset', { id: m.machineId, error: (e as Error).message }),
        );
      }
  }

  /** Removes the namespace (its link and tap with it) and frees the slot. Idempotent. */
  async detach(net: MachineNet): Promise<void> {
    await this.leave(net);
    if (this.byId.get(net.machineId) === net) this.byId.delete(net.machineId);
    if (this.byNsAddr.get(net.outside.ns) === net) this.byNsAddr.delete(net.outside.ns);
    if (existsSync(`/run/netns/${net.netns}`)) await run('ip', ['netns', 'del', net.netns]);
    // The host end goes with its peer; a link left by a crash mid-setup goes here.
    await run('ip', ['link', 'del', net.outside.hostLink]).catch(() => {});
    this.slots.release(net.outside.slot, net.netns);
  }

  /**
   * Removes this daemon's namespaces and slots whose machine `keep` does not claim (crash
   * leftovers): one `ip -batch` for all of them, so hundreds take about as long as one.
   */
  async sweep(keep: (machineId: string) => boolean): Promise<string[]> {
    const prefix = `hutch-${this.tag}-`;
    await this.resetPeers();
    const gone = netnsNames().filter((n) => n.startsWith(prefix) && !keep(n.slice(prefix.length)));
    if (gone.length)
      await run('ip', ['-force', '-batch', '-'], gone.map((n) => `netns del ${n}`).join('\n')).catch((e) => {
        this.log('warn', 'network sweep: some namespaces not removed', { error: (e as Error).message });
      });
    const links = await run('ip', ['-o', 'link', 'show']).catch(() => '');
    const live = new Set(netnsNames().filter((n) => n.startsWith(prefix)));
    for (const { slot, owner } of this.slots.list()) {
      if (!owner.startsWith(prefix) || live.has(owner)) continue;
      const link = outsideOf(this.s.pool, this.tag, slot).hostLink;
      if (links.includes(` ${link}@`) || links.includes(` ${link}:`))
        await run('ip', ['link', 'del', link]).catch(() => {});
      this.slots.release(slot, owner);
    }
    return gone.map((n) => n.slice(prefix.length));
  }

  /** Drops net.db rows of machines `keep` does not claim. */
  forgetAllBut(keep: (machineId: string) => boolean): number {
    this.rules.clear();
    return this.store.forgetAllBut(keep);
  }

  /** Drops what net.db and memory hold about a machine that is gone. */
  forget(machineId: string): void {
    this.store.forgetMachine(machineId);
    this.rules.delete(machineId);
    this.dnsDenials.delete(machineId);
  }

  // -- egress rules

  rulesOf(machineId: string): EgressRules {
    // Asked on every DNS query: kept in memory, written through (saveRules is the only writer).
    const cached = this.rules.get(machineId);
    if (cached) return cached;
    const row = this.store.database.prepare('SELECT rules FROM egress WHERE machine_id = ?').get(machineId) as
      | { rules: string }
      | undefined;
    const rules = row ? (JSON.parse(row.rules) as EgressRules) : noEgressRules;
    this.rules.set(machineId, rules);
    return rules;
  }

  /** Records a machine's rules (at create, before its namespace exists). */
  saveRules(machineId: string, rules: EgressRules): void {
    this.store.database
      .prepare('INSERT OR REPLACE INTO egress VALUES (?, ?, ?)')
      .run(machineId, JSON.stringify(rules), Date.now());
    this.rules.set(machineId, rules);
  }

  /** Copies a machine's rules to a new one (a branch keeps its source's firewall). */
  copyRules(from: string, to: string): void {
    this.saveRules(to, this.rulesOf(from));
  }

  /** Changes a machine's rules: stored, then applied to its running namespace in one transaction. */
  async setRules(machineId: string, rules: EgressRules): Promise<void> {
    const before = this.rulesOf(machineId);
    const net = this.byId.get(machineId);
    // Applied first, recorded after: a refused update changes neither.
    if (net) {
      const domainsChanged =
        JSON.stringify([before.allowDomains, before.denyDomains]) !==
        JSON.stringify([rules.allowDomains, rules.denyDomains]);
      await inNetns(net.netns, 'nft', ['-f', '-'], egressUpdate(this.firewall(net), rules, domainsChanged));
      if (domainsChanged) net.resolved.clear();
    }
    this.saveRules(machineId, rules);
  }

  /** Opens addresses an allowed name resolved to, for that machine only (the resolver calls this). */
  async openResolved(machineId: string, addresses: string[], ttlSeconds: number): Promise<void> {
    const net = this.byId.get(machineId);
    if (!net || addresses.length === 0) return;
    // At least 10 minutes: a connection must not be cut because the name's TTL ran out mid-download.
    const t = Math.min(Math.max(ttlSeconds, 600), 86_400);
    const now = Date.now();
    // A guest resolves the same names over and over: an address with more than half its time
    // left is not written again (each write is an nft process).
    const open = net.resolved;
    const due = addresses.filter((a) => (open.get(a) ?? 0) - now < (t * 1000) / 2);
    if (!due.length) return;
    const elems = due.map((a) => `${a} timeout ${t}s`).join(', ');
    await inNetns(net.netns, 'nft', ['-f', '-'], `add element ip hutch resolved { ${elems} }\n`);
    for (const a of due) open.set(a, now + t * 1000);
    if (open.size > 65_536) open.clear();
  }

  recordDnsDenial(machineId: string, name: string, reason: string): void {
    const list = this.dnsDenials.get(machineId) ?? [];
    const found = list.find((d) => d.name === name);
    const now = new Date().toISOString();
    if (found) {
      found.count++;
      found.last_seen = now;
    } else list.push({ reason: 'dns', destination: name, name, detail: reason, count: 1, last_seen: now });
    list.sort((a, b) => b.last_seen.localeCompare(a.last_seen));
    this.dnsDenials.set(machineId, list.slice(0, 100));
  }

  /** The rules, the denial counters and the latest refused destinations of a machine. */
  async egressOf(machineId: string): Promise<{
    rules: { allow: string[]; deny: string[] };
    denied: Record<string, number>;
    recent: Denial[];
  }> {
    const rules = egressView(this.rulesOf(machineId));
    const denied: Record<string, number> = {};
    const recent: Denial[] = [...(this.dnsDenials.get(machineId) ?? [])];
    denied.dns = recent.reduce((a, d) => a + d.count, 0);
    const net = this.byId.get(machineId);
    if (net) {
      const out = JSON.parse(await inNetns(net.netns, 'nft', ['-j', 'list', 'table', 'ip', 'hutch'])) as {
        nftables: Record<string, unknown>[];
      };
      const now = Date.now();
      for (const o of out.nftables) {
        const c = o.counter as { name: string; packets: number } | undefined;
        if (c?.name.startsWith('n_denied_')) denied[reasonOf(c.name.slice('n_denied_'.length))] = c.packets;
        const s = o.set as { name: string; elem?: unknown[]; timeout?: number } | undefined;
        if (!s?.name.startsWith('denied_') || !s.elem) continue;
        for (const e of s.elem) {
          const el = (
            e as {
              elem: {
                val: { concat: [string, string, number] };
                expires: number;
                counter?: { packets: number };
              };
            }
          ).elem;
          const [destination, protocol, port] = el.val.concat;
          const age = (s.timeout ?? 3600) * 1000 - el.expires * 1000;
          recent.push({
            reason: reasonOf(s.name.slice('denied_'.length)) as DenialReason,
            destination,
            protocol,
            port,
            count: el.counter?.packets ?? 1,
            last_seen: new Date(now - Math.max(0, age)).toISOString(),
          });
        }
      }
    }
    recent.sort((a, b) => b.last_seen.localeCompare(a.last_seen));
    return { rules, denied, recent: recent.slice(0, 100) };
  }
}

function reasonOf(setSuffix: string): string {
  return denialReasons.find((r) => r.replace('-', '_') === setSuffix) ?? setSuffix;
}

/** What `adopt` reads back after a restart: the namespace, its slot and its network. */
function writeNetFile(runDir: string, net: MachineNet): void {
  const { netns, outside, networkId } = net;
  writeFileSync(join(runDir, netFile), JSON.stringify({ netns, slot: outside.slot, networkId }));
}

/** The named network namespaces. `/run/netns` is made by the first `ip netns add` after a boot. */
function netnsNames(): string[] {
  return existsSync('/run/netns') ? readdirSync('/run/netns') : [];
}
