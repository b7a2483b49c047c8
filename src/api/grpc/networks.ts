import type { ProxyView } from '../../engine/net-routing.js';
import { HutchError } from '../../errors.js';
import { required, text, vmRef } from './args.js';
import { type Cx, type Rpc, unary } from './rpc.js';

/**
 * Networks, proxies and domains (net/directory.ts). A VM is on its owner's default network (the
 * proto has no field to name another; the REST API's `network_id` does); proxies and bound
 * domains route HTTP by Host to a port of a VM (net/preview), and are public: the name is the URL.
 */

const bad = (message: string): HutchError => new HutchError('INVALID_ARGUMENT', message);

/** A proxy port as SetProxyPort takes it: "auto" (or "" / "0") for the first port the VM listens on. */
function portOf(v: string | number, field = 'port'): number {
  const s = String(v).trim().toLowerCase();
  if (s === 'auto' || s === '' || s === '0') return 0;
  if (!/^\d{1,5}$/.test(s) || Number(s) > 65535)
    throw bad(`${field} ${JSON.stringify(v)}: 1–65535 or "auto"`);
  return Number(s);
}

function proxyInfo(p: ProxyView): Record<string, unknown> {
  return {
    name: p.name,
    vm_name: p.vm_name,
    domain: p.domain,
    port: p.port,
    is_default: p.is_default,
    port_display: p.port_display,
  };
}

/** A proxy of the caller's, checked to be on `vm_name` when one is given. */
function ownProxy(cx: Cx, name: string, vm: string): void {
  if (vm && !cx.act.listProxies(vm).some((p) => p.name === name))
    throw new HutchError('PROXY_NOT_FOUND', `no proxy ${JSON.stringify(name)} on ${vm}`);
}

export const networkRpcs: Record<string, Rpc> = {
  CreateNetwork: unary((req: { name: string }, cx) => ({
    network_id: cx.act.createNetwork(required(req.name, 'name')).network_id,
  })),
  ListNetworks: unary((_req: unknown, cx) => ({
    networks: cx.act
      .listNetworks()
      .map((n) => ({ network_id: n.network_id, subnet: n.subnet, status: n.status })),
  })),
  BindDomain: unary((req: { domain: string; vm_id: string }, cx) => {
    cx.act.bindDomain(required(req.domain, 'domain'), vmRef(req.vm_id));
    return {};
  }),
  UnbindDomain: unary((req: { domain: string }, cx) => {
    cx.act.unbindDomain(required(req.domain, 'domain'));
    return {};
  }),
  ListDomains: unary((_req: unknown, cx) => ({
    domains: cx.act.listDomains().map((d) => ({ domain: d.domain, vm_id: d.vm_id })),
  })),
  ListProxies: unary((req: { vm_name: string }, cx) => ({
    proxies: cx.act.listProxies(req.vm_name ? vmRef(req.vm_name, 'vm_name') : undefined).map(proxyInfo),
  })),
  CreateProxy: unary((req: { name: string; vm_name: string; port: number }, cx) => {
    const p = cx.act.createProxy({
      name: required(req.name, 'name'),
      vm: vmRef(req.vm_name, 'vm_name'),
      port: portOf(req.port),
    });
    return { name: p.name, vm_name: p.vm_name, domain: p.domain, port: p.port };
  }),
  DeleteProxy: unary((req: { name: string; vm_name: string }, cx) => {
    const name = required(req.name, 'name');
    ownProxy(cx, name, req.vm_name ? vmRef(req.vm_name, 'vm_name') : '');
    cx.act.deleteProxy(name);
    return {};
  }),
  SetProxyPort: unary((req: { name: string; vm_name: string; port: string }, cx) => {
    const name = required(req.name, 'name');
    ownProxy(cx, name, req.vm_name ? vmRef(req.vm_name, 'vm_name') : '');
    cx.act.setProxyPort(name, portOf(text(req.port, 'port', 16)));
    return {};
  }),
};
