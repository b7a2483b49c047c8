import { inside, nsLink } from './addressing.js';
import type { EgressRules } from './egress.js';
import { alwaysDeniedV4 } from './ranges.js';

/** Why a guest's packet was refused; each has a counter and a set of recent destinations. */
export const denialReasons = ['always', 'rule', 'not-allowed', 'limit'] as const;
export type DenialReason = (typeof denialReasons)[number];

const setOf = (r: DenialReason): string => `denied_${r.replace('-', '_')}`;

export interface NsFirewall {
  /** The host's end of the machine's link: the resolver answers there. */
  hostAddr: string;
  /** The namespace's end: the guest's traffic leaves as this address. */
  nsAddr: string;
  dnsPort: number;
  /** Open connections (conntrack entries) the guest may have at once. */
  maxConnections: number;
  /** Per direction; 0: unlimited. */
  bytesPerSecond: number;
  /** The host's own addresses (its uplink's among them), refused like the private ranges. */
  hostAddrs: readonly string[];
}

/**
 * The firewall inside one machine's namespace (nft table `ip hutch`): every packet the guest
 * sends is judged on its way through (not only the first of a connection), so a rule changed at
 * run time also cuts connections already open. Order: the resolver; network mates; the always-
 * denied ranges (the host, private space, metadata, other guests), DNS-over-TLS; the user's deny
 * list; then, with an allow list, only its CIDRs and the addresses its domains resolved to for
 * this guest. Refusals answer at once (TCP reset, ICMP admin-prohibited), never a silent drop.
 */
export function nsRuleset(f: NsFirewall, rules: EgressRules): string {
  const always = [...alwaysDeniedV4, ...f.hostAddrs].join(', ');
  const lines = [
    'table ip hutch {',
    `  set always { type ipv4_addr; flags interval; auto-merge; elements = { ${always} } }`,
    '  set allow { type ipv4_addr; flags interval; auto-merge; }',
    '  set deny { type ipv4_addr; flags interval; auto-merge; }',
    '  set resolved { type ipv4_addr; flags timeout; size 65536; }',
    '  set peers { type ipv4_addr; size 4096; }',
    `  set ctlimit { type ipv4_addr; size 4; flags dynamic; }`,
    ...denialReasons.flatMap((r) => [
      `  set ${setOf(r)} { type ipv4_addr . inet_proto . inet_service; size 256; flags dynamic,timeout; timeout 1h; counter; }`,
      `  counter n_${setOf(r)} { }`,
    ]),
    '  chain prerouting { type nat hook prerouting priority dstnat;',
    ...preroutingRules(f),
    '  }',
    '  chain postrouting { type nat hook postrouting priority srcnat;',
    `    oifname "${nsLink}" snat to ${f.nsAddr}`,
    '  }',
    '  chain input { type filter hook input priority filter;',
    // Replies to what the host itself opened into the namespace (nothing else runs there).
    `    iifname "${inside.tap}" ct state established,related accept`,
    `    iifname "${inside.tap}" meta l4proto tcp reject with tcp reset`,
    `    iifname "${inside.tap}" reject with icmp type admin-prohibited`,
    '  }',
    '  chain forward { type filter hook forward priority filter; policy drop;',
    ...(f.bytesPerSecond > 0
      ? [
          `    oifname "${inside.tap}" limit rate over ${f.bytesPerSecond} bytes/second burst ${Math.max(f.bytesPerSecond, 65536)} bytes drop`,
          `    iifname "${inside.tap}" limit rate over ${f.bytesPerSecond} bytes/second burst ${Math.max(f.bytesPerSecond, 65536)} bytes drop`,
        ]
      : []),
    `    iifname "${nsLink}" oifname "${inside.tap}" ct state established,related accept`,
    `    iifname "${nsLink}" oifname "${inside.tap}" ct status dnat ip saddr @peers accept`,
    `    iifname "${inside.tap}" oifname "${nsLink}" jump egress`,
    '  }',
    egressChain(f, rules),
    '  chain ok {',
    `    ct state new add @ctlimit { ip saddr ct count over ${f.maxConnections} } jump deny_limit`,
    '    accept',
    '  }',
    ...denialReasons.map((r) =>
      [
        `  chain deny_${r.replace('-', '_')} {`,
        `    counter name n_${setOf(r)}`,
        `    meta l4proto { tcp, udp } update @${setOf(r)} { ip daddr . meta l4proto . th dport }`,
        '    meta l4proto tcp reject with tcp reset',
        '    reject with icmp type admin-prohibited',
        '  }',
      ].join('\n'),
    ),
    '}',
  ];
  return `${lines.join('\n')}\n${elements(rules)}`;
}

function preroutingRules(f: NsFirewall): string[] {
  return [
    // Every DNS packet goes to hutch's resolver, whatever server the guest names.
    `    iifname "${inside.tap}" meta l4proto { tcp, udp } th dport 53 dnat to ${f.hostAddr}:${f.dnsPort}`,
    `    iifname "${nsLink}" ip daddr ${f.nsAddr} ip saddr @peers dnat to ${inside.guest}`,
  ];
}

/**
 * A restarted daemon's resolver listens on another port: the rules of the namespaces it adopts
 * are pointed at it (nothing else changes; the sets, counters and refusals stay).
 */
export function resolverUpdate(f: NsFirewall, rules: EgressRules): string {
  return [
    'flush chain ip hutch prerouting',
    'flush chain ip hutch egress',
    'table ip hutch {',
    '  chain prerouting {',
    ...preroutingRules(f),
    '  }',
    egressChain(f, rules),
    '}',
    '',
  ].join('\n');
}

function egressChain(f: NsFirewall, rules: EgressRules): string {
  const allowMode = rules.allowCidrs.length + rules.allowDomains.length > 0;
  return [
    '  chain egress {',
    // A packet of a connection this namespace never saw (a restored or branched guest's old
    // connections): reset at once rather than leaking out un-NATed or hanging.
    '    tcp flags & (fin | syn | rst | ack) != syn ct state new reject with tcp reset',
    `    ct status dnat ip daddr ${f.hostAddr} th dport ${f.dnsPort} accept`,
    '    ip daddr @peers jump ok',
    '    ip daddr @always jump deny_always',
    '    tcp dport 853 jump deny_always',
    '    ip daddr @deny jump deny_rule',
    ...(allowMode
      ? ['    ip daddr @allow jump ok', '    ip daddr @resolved jump ok', '    jump deny_not_allowed']
      : ['    jump ok']),
    '  }',
  ].join('\n');
}

function elements(rules: EgressRules): string {
  const out: string[] = [];
  if (rules.allowCidrs.length) out.push(`add element ip hutch allow { ${rules.allowCidrs.join(', ')} }`);
  if (rules.denyCidrs.length) out.push(`add element ip hutch deny { ${rules.denyCidrs.join(', ')} }`);
  return out.length ? `${out.join('\n')}\n` : '';
}

/**
 * Changing a running machine's rules, in one nft transaction: the sets refilled and the egress
 * chain rebuilt (allow-list mode or not), so no packet is judged by half-old rules. The resolved
 * addresses go too when the domain rules change: names no longer allowed must not stay open.
 */
export function egressUpdate(f: NsFirewall, rules: EgressRules, flushResolved: boolean): string {
  return [
    'flush set ip hutch allow',
    'flush set ip hutch deny',
    ...(flushResolved ? ['flush set ip hutch resolved'] : []),
    // Flushed and refilled (it cannot be deleted: the forward chain jumps to it).
    'flush chain ip hutch egress',
    'table ip hutch {',
    egressChain(f, rules),
    '}',
    elements(rules),
  ].join('\n');
}

export interface HostFirewall {
  /** The daemon's tag: its links are `hv<tag>*`. */
  tag: string;
  /** The outside pool (all daemons' guests' namespace ends are in it). */
  pool: string;
  dnsPort: number;
  /** Masquerade only out of this interface; '' = any interface that is not a guest link. */
  uplink: string;
}

/**
 * The host's part (table `inet hutch-<tag>`, one per daemon): guests reach the host only at the
 * resolver, on their own link (the namespace rules already refuse the host's addresses; this is
 * the second wall, and it also covers the host's public address, which a forward-only rule
 * misses); they are forwarded to the uplink (masqueraded) and to other guest links (where the
 * namespaces decide), nowhere else.
 */
export function hostRuleset(h: HostFirewall): string {
  const mine = `"hv${h.tag}*"`;
  const uplink = h.uplink ? `oifname "${h.uplink}"` : 'oifname != "hv*"';
  const table = `inet hutch-${h.tag}`;
  return [
    `table ${table}`,
    `delete table ${table}`,
    `table ${table} {`,
    '  chain input { type filter hook input priority filter - 5; policy accept;',
    `    iifname ${mine} meta l4proto { tcp, udp } th dport ${h.dnsPort} accept`,
    `    iifname ${mine} meta l4proto tcp reject with tcp reset`,
    `    iifname ${mine} reject with icmpx type admin-prohibited`,
    // The resolver listens on every address: only its guests (and the host itself) may ask it.
    `    iifname != "lo" meta l4proto { tcp, udp } th dport ${h.dnsPort} drop`,
    '  }',
    '  chain forward { type filter hook forward priority filter - 5; policy accept;',
    `    iifname ${mine} oifname "hv*" accept`,
    `    iifname ${mine} ${uplink} accept`,
    `    iifname ${mine} reject with icmpx type admin-prohibited`,
    `    oifname ${mine} ct state established,related accept`,
    `    oifname ${mine} iifname "hv*" accept`,
    `    oifname ${mine} drop`,
    '  }',
    '  chain postrouting { type nat hook postrouting priority srcnat;',
    `    ip saddr ${h.pool} ${uplink} masquerade`,
    '  }',
    '}',
    '',
  ].join('\n');
}
