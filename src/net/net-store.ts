import type Database from 'better-sqlite3';
import { openOwnerOnlyDb } from '../sqlite-file.js';

/** A user's private network: their machines on it reach each other, nobody else's do. */
export interface NetworkRow {
  id: string;
  owner: string;
  name: string;
  is_default: 0 | 1;
  created_at: number;
}

/** A name routed to a port of a machine (`{name}.{public domain}`; gRPC CreateProxy). */
export interface ProxyRow {
  id: string;
  owner: string;
  name: string;
  machine_id: string;
  /** 0: the first port the guest listens on, looked up per request. */
  port: number;
  created_at: number;
}

/** A user's own domain routed by the Host header to a port of a machine (gRPC BindDomain). */
export interface DomainRow {
  domain: string;
  owner: string;
  machine_id: string;
  port: number;
  created_at: number;
}

const migrations = [
  `CREATE TABLE egress (
     machine_id TEXT PRIMARY KEY,
     rules TEXT NOT NULL,
     updated_at INTEGER NOT NULL
   );
   CREATE TABLE public_ports (
     machine_id TEXT NOT NULL,
     port INTEGER NOT NULL,
     PRIMARY KEY (machine_id, port)
   );
   CREATE TABLE networks (
     id TEXT PRIMARY KEY,
     owner TEXT NOT NULL,
     name TEXT NOT NULL,
     is_default INTEGER NOT NULL,
     created_at INTEGER NOT NULL,
     UNIQUE (owner, name)
   );
   CREATE TABLE network_members (
     machine_id TEXT PRIMARY KEY,
     network_id TEXT NOT NULL REFERENCES networks(id)
   );
   CREATE TABLE proxies (
     id TEXT PRIMARY KEY,
     owner TEXT NOT NULL,
     name TEXT NOT NULL UNIQUE,
     machine_id TEXT NOT NULL,
     port INTEGER NOT NULL,
     created_at INTEGER NOT NULL
   );
   CREATE TABLE domains (
     domain TEXT PRIMARY KEY,
     owner TEXT NOT NULL,
     machine_id TEXT NOT NULL,
     port INTEGER NOT NULL,
     created_at INTEGER NOT NULL
   );`,
  // A public port is opened as its machine's owner, with no caller to find the machine for.
  'ALTER TABLE public_ports ADD COLUMN owner TEXT',
];

/**
 * Networking's own state (`<state dir>/net.db`): egress rules, public preview ports, networks,
 * proxies and domains. Rows name machines by id; a machine's rows go when it does
 * (`forgetMachine`), and a starting daemon drops rows of machines it no longer has.
 */
export class NetStore {
  private readonly db: Database.Database;

  constructor(path: string) {
    this.db = openOwnerOnlyDb(path, migrations);
  }

  close(): void {
    this.db.close();
  }

  // -- public preview ports

  isPublicPort(machineId: string, port: number): boolean {
    return this.publicPortOwner(machineId, port) !== undefined;
  }

  /** The owner of a public port's machine; undefined when the port is not public. */
  publicPortOwner(machineId: string, port: number): string | undefined {
    const row = this.db
      .prepare('SELECT owner FROM public_ports WHERE machine_id = ? AND port = ? AND owner IS NOT NULL')
      .get(machineId, port) as { owner: string } | undefined;
    return row?.owner;
  }

  setPublicPort(machineId: string, port: number, isPublic: boolean, owner: string): void {
    if (isPublic)
      this.db
        .prepare(
          'INSERT INTO public_ports (machine_id, port, owner) VALUES (?, ?, ?) ' +
            'ON CONFLICT (machine_id, port) DO UPDATE SET owner = excluded.owner',
        )
        .run(machineId, port, owner);
    else this.db.prepare('DELETE FROM public_ports WHERE machine_id = ? AND port = ?').run(machineId, port);
  }

  publicPorts(machineId: string): number[] {
    return (
      this.db.prepare('SELECT port FROM public_ports WHERE machine_id = ? ORDER BY port').all(machineId) as {
        port: number;
      }[]
    ).map((r) => r.port);
  }

  // -- proxies and domains (routing by Host)

  proxyByName(name: string): ProxyRow | undefined {
    return this.db.prepare('SELECT * FROM proxies WHERE name = ?').get(name) as ProxyRow | undefined;
  }

  proxiesOf(owner: string): ProxyRow[] {
    return this.db.prepare('SELECT * FROM proxies WHERE owner = ? ORDER BY rowid').all(owner) as ProxyRow[];
  }

  domain(domain: string): DomainRow | undefined {
    return this.db.prepare('SELECT * FROM domains WHERE domain = ?').get(domain) as DomainRow | undefined;
  }

  domainsOf(owner: string): DomainRow[] {
    return this.db.prepare('SELECT * FROM domains WHERE owner = ? ORDER BY rowid').all(owner) as DomainRow[];
  }

  /** Drops every row naming a machine that is gone. */
  forgetMachine(machineId: string): void {
    this.db.transaction(() => {
      for (const t of ['egress', 'public_ports', 'network_members', 'proxies', 'domains'])
        this.db.prepare(`DELETE FROM ${t} WHERE machine_id = ?`).run(machineId);
    })();
  }

  /** Drops the rows of every machine `keep` does not claim (a daemon starting after a crash). */
  forgetAllBut(keep: (machineId: string) => boolean): number {
    let n = 0;
    this.db.transaction(() => {
      for (const t of ['egress', 'public_ports', 'network_members', 'proxies', 'domains']) {
        const ids = this.db.prepare(`SELECT DISTINCT machine_id FROM ${t}`).all() as { machine_id: string }[];
        for (const { machine_id } of ids)
          if (!keep(machine_id))
            n += this.db.prepare(`DELETE FROM ${t} WHERE machine_id = ?`).run(machine_id).changes;
      }
    })();
    return n;
  }

  /** The underlying database, for the net/ modules that own the other tables' queries. */
  get database(): Database.Database {
    return this.db;
  }
}
