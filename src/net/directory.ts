import { randomBytes } from 'node:crypto';
import { HutchError } from '../errors.js';
import type { DomainRow, NetStore, NetworkRow, ProxyRow } from './net-store.js';

/** A proxy name is a DNS label: it is the first label of `{name}.{public domain}`. */
const proxyName = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;
const domainName = /^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$/;

export interface NetworkInfo {
  network_id: string;
  name: string;
  subnet: string;
  status: 'active';
  is_default: boolean;
}

/**
 * Users' networks, proxies and domains (net.db). Networks: every user has a default one (made
 * on first use); a networked machine joins its owner's default network unless it was put on
 * another of theirs, and reaches the other members at their `address`. Proxies and domains are
 * Host-routing records (net/preview): a proxy name and a domain each belong to one user.
 */
export class NetDirectory {
  constructor(
    private readonly store: NetStore,
    /** The outside pool: every member's address is in it. */
    private readonly subnet: string,
    /** HUTCH_PUBLIC_DOMAIN: its names are proxies' and machines', never a user's domain. */
    private readonly publicDomain?: string,
  ) {}

  private get db() {
    return this.store.database;
  }

  defaultNetwork(owner: string): NetworkRow {
    const row = this.db.prepare('SELECT * FROM networks WHERE owner = ? AND is_default = 1').get(owner) as
      | NetworkRow
      | undefined;
    if (row) return row;
    const made: NetworkRow = {
      id: `net-${randomBytes(4).toString('hex')}`,
      owner,
      name: 'default',
      is_default: 1,
      created_at: Date.now(),
    };
    this.db
      .prepare('INSERT OR IGNORE INTO networks VALUES (@id, @owner, @name, @is_default, @created_at)')
      .run(made);
    return this.defaultNetwork(owner);
  }

  createNetwork(owner: string, name: string): NetworkRow {
    if (!proxyName.test(name))
      throw new HutchError(
        'INVALID_ARGUMENT',
        `network name ${JSON.stringify(name)}: lower-case letters, digits and dashes`,
      );
    this.defaultNetwork(owner);
    const row: NetworkRow = {
      id: `net-${randomBytes(4).toString('hex')}`,
      owner,
      name,
      is_default: 0,
      created_at: Date.now(),
    };
    const r = this.db
      .prepare('INSERT OR IGNORE INTO networks VALUES (@id, @owner, @name, @is_default, @created_at)')
      .run(row);
    if (r.changes === 0)
      throw new HutchError('NAME_TAKEN', `you already have a network named ${JSON.stringify(name)}`);
    return row;
  }

  networks(owner: string): NetworkInfo[] {
    this.defaultNetwork(owner);
    return (
      this.db
        .prepare('SELECT * FROM networks WHERE owner = ? ORDER BY is_default DESC, rowid')
        .all(owner) as NetworkRow[]
    ).map((n) => ({
      network_id: n.id,
      name: n.name,
      subnet: this.subnet,
      status: 'active',
      is_default: n.is_default === 1,
    }));
  }

  network(owner: string, idOrName: string): NetworkRow {
    const row = this.db
      .prepare('SELECT * FROM networks WHERE owner = ? AND (id = ? OR name = ?)')
      .get(owner, idOrName, idOrName) as NetworkRow | undefined;
    if (!row) throw new HutchError('NETWORK_NOT_FOUND', `no network ${JSON.stringify(idOrName)}`);
    return row;
  }

  /** The network a machine is on: the one it was put on, else its owner's default. */
  networkOf(machineId: string, owner: string): string {
    const row = this.db
      .prepare('SELECT network_id FROM network_members WHERE machine_id = ?')
      .get(machineId) as { network_id: string } | undefined;
    return row?.network_id ?? this.defaultNetwork(owner).id;
  }

  /** The network a machine was put on, if any (absent: its owner's default). */
  memberOf(machineId: string): string | undefined {
    const row = this.db
      .prepare('SELECT network_id FROM network_members WHERE machine_id = ?')
      .get(machineId) as { network_id: string } | undefined;
    return row?.network_id;
  }

  /** Puts a machine on one of its owner's networks (at create; a branch inherits its source's). */
  setNetwork(machineId: string, networkId: string): void {
    this.db.prepare('INSERT OR REPLACE INTO network_members VALUES (?, ?)').run(machineId, networkId);
  }

  // -- proxies

  createProxy(owner: string, name: string, machineId: string, port: number, isDefault = false): ProxyRow {
    if (!proxyName.test(name))
      throw new HutchError(
        'INVALID_ARGUMENT',
        `proxy name ${JSON.stringify(name)}: a DNS label (lower-case letters, digits and dashes, at most 63)`,
      );
    checkPort(port);
    const row: ProxyRow = {
      id: `${isDefault ? 'pxd' : 'px'}-${randomBytes(4).toString('hex')}`,
      owner,
      name,
      machine_id: machineId,
      port,
      created_at: Date.now(),
    };
    const r = this.db
      .prepare('INSERT OR IGNORE INTO proxies VALUES (@id, @owner, @name, @machine_id, @port, @created_at)')
      .run(row);
    // Names are global (they are host names): another user's is taken too, without saying whose.
    if (r.changes === 0)
      throw new HutchError('NAME_TAKEN', `the proxy name ${JSON.stringify(name)} is taken`);
    return row;
  }

  proxy(owner: string, name: string): ProxyRow {
    const row = this.store.proxyByName(name);
    if (!row || row.owner !== owner)
      throw new HutchError('PROXY_NOT_FOUND', `no proxy ${JSON.stringify(name)}`);
    return row;
  }

  proxies(owner: string, machineId?: string): ProxyRow[] {
    return this.store.proxiesOf(owner).filter((p) => machineId === undefined || p.machine_id === machineId);
  }

  deleteProxy(owner: string, name: string): void {
    const row = this.proxy(owner, name);
    this.db.prepare('DELETE FROM proxies WHERE id = ?').run(row.id);
  }

  setProxyPort(owner: string, name: string, port: number): void {
    checkPort(port);
    const row = this.proxy(owner, name);
    this.db.prepare('UPDATE proxies SET port = ? WHERE id = ?').run(port, row.id);
  }

  // -- domains

  bindDomain(owner: string, domain: string, machineId: string, port = 0): DomainRow {
    const d = domain.trim().toLowerCase().replace(/\.$/, '');
    if (!domainName.test(d))
      throw new HutchError(
        'INVALID_ARGUMENT',
        `domain ${JSON.stringify(domain)}: a fully qualified host name`,
      );
    checkPort(port);
    const pd = this.publicDomain?.toLowerCase();
    if (pd && (d === pd || d.endsWith(`.${pd}`)))
      throw new HutchError('INVALID_ARGUMENT', `${d} is under this server's own domain (${pd}): use a proxy`);
    const row: DomainRow = { domain: d, owner, machine_id: machineId, port, created_at: Date.now() };
    const existing = this.store.domain(d);
    if (existing && existing.owner !== owner)
      throw new HutchError('DOMAIN_TAKEN', `the domain ${d} is bound by another user`);
    this.db
      .prepare('INSERT OR REPLACE INTO domains VALUES (@domain, @owner, @machine_id, @port, @created_at)')
      .run(row);
    return row;
  }

  unbindDomain(owner: string, domain: string): void {
    const d = domain.trim().toLowerCase().replace(/\.$/, '');
    const row = this.store.domain(d);
    if (!row || row.owner !== owner)
      throw new HutchError('DOMAIN_NOT_FOUND', `no domain ${JSON.stringify(domain)} of yours`);
    this.db.prepare('DELETE FROM domains WHERE domain = ?').run(d);
  }

  domains(owner: string): DomainRow[] {
    return this.store.domainsOf(owner);
  }
}

function checkPort(port: number): void {
  if (!Number.isInteger(port) || port < 0 || port > 65535)
    throw new HutchError(
      'INVALID_ARGUMENT',
      `port ${port}: 1–65535, or 0 for the first port the machine listens on`,
    );
}
