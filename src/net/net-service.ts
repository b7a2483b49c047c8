import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Log } from '../background.js';
import type { Config } from '../config.js';
import { DomainRules } from './dns/domain-rules.js';
import { type ClientPolicy, DnsResolver, type Upstream } from './dns/resolver.js';
import type { NetStore } from './net-store.js';
import { NetworkManager } from './network-manager.js';

export interface Networking {
  manager: NetworkManager;
  store: NetStore;
  resolver: DnsResolver;
  dnsPort: number;
  close(opts: { keepHost: boolean }): Promise<void>;
}

/**
 * Starts guest networking: net.db, the guests' resolver (their only DNS: net/dns) and the
 * host's part of the firewall. The resolver knows a guest by the address its namespace
 * masquerades it to, and asks the manager for that machine's rules on every query.
 */
export async function startNetworking(config: Config, store: NetStore, log: Log): Promise<Networking> {
  const manager = new NetworkManager(
    {
      stateDir: config.stateDir,
      pool: config.netPool,
      uplink: config.netUplink,
      maxConnections: config.netMaxConnections,
      bytesPerSecond: config.netBytesPerSecond,
      slotDir: '/run/hutch/net-slots',
      publicDomain: config.publicDomain,
    },
    store,
    log,
  );
  const policies = new Map<string, { key: string; policy: ClientPolicy }>();
  const policyFor = (address: string): ClientPolicy | undefined => {
    const net = manager.machineAt(address);
    if (!net) return undefined;
    const rules = manager.rulesOf(net.machineId);
    // Compiled once per rule set, not per query.
    const key = JSON.stringify([rules.allowDomains, rules.denyDomains, rules.allowCidrs.length]);
    const cached = policies.get(net.machineId);
    if (cached?.key === key) return cached.policy;
    const id = net.machineId;
    // An allow list of CIDRs only still lets every name resolve: the addresses decide.
    const policy: ClientPolicy = {
      id,
      allow: rules.allowDomains.length ? new DomainRules(rules.allowDomains) : null,
      deny: new DomainRules(rules.denyDomains),
      // Waited for by the resolver: the addresses are open before the guest hears of them.
      onAnswer: (_name, addresses, ttl) =>
        rules.allowDomains.length ? manager.openResolved(id, addresses, ttl) : undefined,
      onDenied: ({ name, reason }) => manager.recordDnsDenial(id, name, reason),
    };
    policies.set(id, { key, policy });
    return policy;
  };
  // The port of the last run when it is free: namespaces of machines that outlived a restart keep
  // sending their DNS there (their rules are also pointed at the new port when adopted).
  const portFile = join(config.stateDir, 'dns-port');
  const last = existsSync(portFile) ? Number(readFileSync(portFile, 'utf8')) || 0 : 0;
  const make = (port: number): DnsResolver =>
    new DnsResolver({
      host: '0.0.0.0',
      port,
      upstreams: upstreamsOf(config.netDns),
      policyFor,
      log: (line) => log('info', 'dns', { line }),
    });
  let resolver = make(last);
  let port: number;
  try {
    ({ port } = await resolver.start());
  } catch {
    resolver = make(0);
    ({ port } = await resolver.start());
  }
  writeFileSync(portFile, String(port));
  try {
    await manager.start(port);
  } catch (e) {
    await resolver.close();
    throw e;
  }
  return {
    manager,
    store,
    resolver,
    dnsPort: port,
    close: async ({ keepHost }) => {
      await resolver.close();
      if (!keepHost) await manager.stopHost();
    },
  };
}

/** "host" or "host:port" entries; none: the host's own resolvers (/etc/resolv.conf). */
export function upstreamsOf(entries: readonly string[]): Upstream[] {
  const list = entries.length ? entries : systemResolvers();
  return list.map((e) => {
    const m = /^([\d.]+)(?::(\d+))?$/.exec(e);
    if (!m) throw new Error(`HUTCH_NET_DNS: ${JSON.stringify(e)} is not an IPv4 address[:port]`);
    return { host: m[1] as string, port: m[2] ? Number(m[2]) : 53 };
  });
}

function systemResolvers(): string[] {
  try {
    return readFileSync('/etc/resolv.conf', 'utf8')
      .split('\n')
      .map((l) => /^\s*nameserver\s+([\d.]+)\s*$/.exec(l)?.[1])
      .filter((x): x is string => !!x);
  } catch {
    return [];
  }
}
