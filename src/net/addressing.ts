import { createHash } from 'node:crypto';

/**
 * Every guest sees the same network from the inside (E2B's way): the same tap name, MAC,
 * address and gateway, behind a network namespace of its own. A snapshot taken with one
 * machine's network therefore restores into any other's, and a branch or a resume only needs a
 * new namespace around the same guest.
 */
export const inside = {
  tap: 'tap0',
  /** The guest's NIC (guest-visible: part of the layout). 02: locally administered. */
  guestMac: '02:68:75:74:63:02',
  /** The tap's own MAC, fixed too: a restored guest's ARP cache still names it. */
  tapMac: '02:68:75:74:63:01',
  guest: '172.31.255.2',
  gateway: '172.31.255.1',
  prefix: 30,
  /** The guest's resolver: the gateway, redirected to the daemon's (net/dns). */
  dns: '172.31.255.1',
  mtu: 1400,
} as const;

/** The namespace side of the link to the host, inside every machine's namespace. */
export const nsLink = 'veth0';

/**
 * The outside addressing of one machine: a /30 of the pool (default 10.213.0.0/16) per slot;
 * `host` is the host's end (the namespace's gateway), `ns` the namespace's (what the guest's
 * traffic is masqueraded to, and what its network mates reach it at).
 */
export interface Outside {
  slot: number;
  host: string;
  ns: string;
  /** Host-side link name: `hv` + the daemon's tag + slot (≤ 15 characters). */
  hostLink: string;
}

/** How many /30 slots a pool holds (slot 0 is never used: its first address is the network's). */
export function slotsIn(pool: string): number {
  const bits = Number(pool.split('/')[1]);
  return 2 ** (32 - bits) / 4;
}

export function outsideOf(pool: string, tag: string, slot: number): Outside {
  const base = ipToInt(pool.split('/')[0] as string) + slot * 4;
  return { slot, host: intToIp(base + 1), ns: intToIp(base + 2), hostLink: `hv${tag}${slot}` };
}

/**
 * A short tag per state dir: several daemons (the tests' among them) share one host, and each
 * must recognise its own namespaces, links and firewall table.
 */
export function daemonTag(stateDir: string): string {
  return createHash('sha256').update(stateDir).digest('hex').slice(0, 4);
}

/** A machine's namespace name. */
export function netnsName(tag: string, machineId: string): string {
  return `hutch-${tag}-${machineId}`;
}

export function ipToInt(ip: string): number {
  return ip.split('.').reduce((a, o) => a * 256 + Number(o), 0);
}

export function intToIp(n: number): string {
  return [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join('.');
}
