import { BlockList, isIPv4 } from 'node:net';

/**
 * Destinations a guest may never reach, whatever its owner's rules say: the host and everything
 * behind it (private ranges, other guests), link-local (the cloud metadata address among them),
 * CGNAT, multicast and reserved space. Shared by the firewall (nft sets) and the DNS resolver
 * (an answer pointing here is refused: DNS rebinding).
 */
export const alwaysDeniedV4: readonly string[] = [
  '0.0.0.0/8',
  '10.0.0.0/8',
  '100.64.0.0/10',
  '127.0.0.0/8',
  '169.254.0.0/16',
  '172.16.0.0/12',
  '192.0.0.0/24',
  '192.168.0.0/16',
  '224.0.0.0/4',
  '240.0.0.0/4',
];

const denied = new BlockList();
for (const c of alwaysDeniedV4) {
  const [net, bits] = c.split('/');
  denied.addSubnet(net as string, Number(bits), 'ipv4');
}

/**
 * Whether a guest may never connect to `ip` (IPv4 dotted quad). IPv6 is never routed for guests,
 * so every IPv6 address counts as denied. `extra` (CIDRs) are ranges the deployment adds, e.g.
 * the host's own uplink addresses, which the resolver must not hand out either.
 */
export function isAlwaysDenied(ip: string, extra?: BlockList): boolean {
  if (!isIPv4(ip)) return true;
  return denied.check(ip, 'ipv4') || (extra?.check(ip, 'ipv4') ?? false);
}
