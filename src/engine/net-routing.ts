import type { Config } from '../config.js';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';
import type { NetDirectory, NetworkInfo } from '../net/directory.js';
import type { ProxyRow } from '../net/net-store.js';
import type { Runtime } from './runtime.js';
import type { MachineRow, Store } from './store.js';

/** A proxy as the APIs show it: a name routed by Host to a port (0: the first it listens on). */
export interface ProxyView {
  name: string;
  vm_id: string;
  vm_name: string;
  /** `{name}.{HUTCH_PUBLIC_DOMAIN}`; '' when the server has no public domain. */
  domain: string;
  port: number;
  port_display: string;
  /** The one made with its VM (gRPC CreateVm). */
  is_default: boolean;
  url: string;
}

export interface DomainView {
  domain: string;
  vm_id: string;
  port: number;
}

/**
 * The engine's networks, proxies and domains actions (net/directory.ts holds the records): each
 * names the caller's own machine or box (another owner's is not found) and answers in the
 * APIs' shape. Engine's methods of the same names delegate here.
 */
export class NetRouting {
  constructor(
    private readonly rt: Runtime,
    private readonly config: Config,
    private readonly store: Store,
    private readonly findAny: (p: Principal, idOrName: string) => MachineRow,
  ) {}

  private directory(): NetDirectory {
    const n = this.rt.d.net;
    if (!n) throw new HutchError('NETWORK_UNAVAILABLE', 'guest networking is off on this server');
    return n.directory;
  }

  /** A VM's default proxy: named after it, port "auto" (gRPC VMs get one at create and fork). */
  createDefaultProxy(p: Principal, vm: string): ProxyView {
    const row = this.findAny(p, vm);
    const name = (row.name && /^[a-z0-9-]{1,63}$/.test(row.name) ? row.name : row.id).replace(/_/g, '-');
    return this.proxyView(this.directory().createProxy(p.user, name, row.id, 0, true));
  }

  /** The caller's networks, their default one first (made on first use). */
  listNetworks(p: Principal): NetworkInfo[] {
    return this.directory().networks(p.user);
  }

  createNetwork(p: Principal, name: string): NetworkInfo {
    const row = this.directory().createNetwork(p.user, name);
    return this.listNetworks(p).find((n) => n.network_id === row.id) as NetworkInfo;
  }

  /** The id of the caller's default network; '' on a server without networking. */
  defaultNetwork(p: Principal): string {
    return this.rt.d.net ? this.directory().defaultNetwork(p.user).id : '';
  }

  listProxies(p: Principal, vm?: string): ProxyView[] {
    const only = vm ? this.findAny(p, vm).id : undefined;
    return this.directory()
      .proxies(p.user, only)
      .map((x) => this.proxyView(x));
  }

  createProxy(p: Principal, req: { name: string; vm: string; port: number }): ProxyView {
    const row = this.findAny(p, req.vm);
    return this.proxyView(this.directory().createProxy(p.user, req.name, row.id, req.port));
  }

  deleteProxy(p: Principal, name: string): void {
    this.directory().deleteProxy(p.user, name);
  }

  setProxyPort(p: Principal, name: string, port: number): ProxyView {
    this.directory().setProxyPort(p.user, name, port);
    return this.proxyView(this.directory().proxy(p.user, name));
  }

  bindDomain(p: Principal, domain: string, vm: string, port = 0): DomainView {
    const row = this.findAny(p, vm);
    const d = this.directory().bindDomain(p.user, domain, row.id, port);
    return { domain: d.domain, vm_id: d.machine_id, port: d.port };
  }

  unbindDomain(p: Principal, domain: string): void {
    this.directory().unbindDomain(p.user, domain);
  }

  listDomains(p: Principal): DomainView[] {
    return this.directory()
      .domains(p.user)
      .map((d) => ({ domain: d.domain, vm_id: d.machine_id, port: d.port }));
  }

  private proxyView(x: ProxyRow): ProxyView {
    const vm = this.store.get(x.machine_id);
    const domain = this.config.publicDomain ? `${x.name}.${this.config.publicDomain}` : '';
    return {
      name: x.name,
      vm_id: x.machine_id,
      vm_name: vm?.name ?? x.machine_id,
      domain,
      port: x.port,
      port_display: x.port === 0 ? 'auto' : String(x.port),
      is_default: x.id.startsWith('pxd-'),
      url: domain ? `${this.config.tlsCert ? 'https' : 'http'}://${domain}/` : '',
    };
  }
}
