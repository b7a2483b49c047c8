import { isIPv4, isIPv6 } from 'node:net';
import { HutchError } from '../errors.js';

/** A user's egress rules as the APIs take them: CIDRs (or single addresses) and domain names. */
export interface EgressInput {
  allow?: string[];
  deny?: string[];
}

/** Rules split by kind, validated and normalised. */
export interface EgressRules {
  allowCidrs: string[];
  allowDomains: string[];
  denyCidrs: string[];
  denyDomains: string[];
}

export const noEgressRules: EgressRules = {
  allowCidrs: [],
  allowDomains: [],
  denyCidrs: [],
  denyDomains: [],
};

/** Per list; a bench measures the decision time at this size. */
export const maxRulesPerList = 1000;

const label = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

/** Parses rules; a bad entry is INVALID_ARGUMENT naming it, and nothing changes. */
export function parseEgress(input: EgressInput): EgressRules {
  const out: EgressRules = { allowCidrs: [], allowDomains: [], denyCidrs: [], denyDomains: [] };
  for (const list of ['allow', 'deny'] as const) {
    const entries = input[list] ?? [];
    if (!Array.isArray(entries)) throw new HutchError('INVALID_ARGUMENT', `egress.${list} must be a list`);
    if (entries.length > maxRulesPerList)
      throw new HutchError(
        'INVALID_ARGUMENT',
        `egress.${list} has ${entries.length} entries; at most ${maxRulesPerList}`,
      );
    for (const raw of entries) {
      if (typeof raw !== 'string')
        throw new HutchError('INVALID_ARGUMENT', `egress.${list}: ${JSON.stringify(raw)} is not a string`);
      const e = raw.trim().toLowerCase();
      const cidr = parseCidr(e);
      if (cidr) (list === 'allow' ? out.allowCidrs : out.denyCidrs).push(cidr);
      else if (isDomainRule(e))
        (list === 'allow' ? out.allowDomains : out.denyDomains).push(e.replace(/\.$/, ''));
      else if (isIPv6(e.split('/')[0] ?? ''))
        throw new HutchError(
          'INVALID_ARGUMENT',
          `egress.${list}: ${raw}: guests have no IPv6 route; only IPv4 rules apply`,
        );
      else
        throw new HutchError(
          'INVALID_ARGUMENT',
          `egress.${list}: ${JSON.stringify(raw)} is neither an IPv4 address/CIDR nor a domain name (like pypi.org or *.pypi.org)`,
        );
    }
  }
  for (const k of Object.keys(out) as (keyof EgressRules)[]) out[k] = [...new Set(out[k])];
  return out;
}

/** The rules as the APIs show them back. */
export function egressView(r: EgressRules): { allow: string[]; deny: string[] } {
  return { allow: [...r.allowCidrs, ...r.allowDomains], deny: [...r.denyCidrs, ...r.denyDomains] };
}

function parseCidr(e: string): string | undefined {
  const [addr, bits, extra] = e.split('/');
  if (extra !== undefined || !addr || !isIPv4(addr)) return undefined;
  const n = bits === undefined ? 32 : Number(bits);
  if (!/^\d{1,2}$/.test(bits ?? '32') || n > 32) return undefined;
  // The network address (nft refuses host bits in an interval element).
  const mask = n === 0 ? 0 : (0xffffffff << (32 - n)) >>> 0;
  const v = (addr.split('.').reduce((a, o) => a * 256 + Number(o), 0) & mask) >>> 0;
  const ip = [24, 16, 8, 0].map((s) => (v >>> s) & 255).join('.');
  return `${ip}/${n}`;
}

function isDomainRule(e: string): boolean {
  const d = e.replace(/\.$/, '');
  const name = d.startsWith('*.') ? d.slice(2) : d;
  if (name.length === 0 || name.length > 253 || isIPv4(name)) return false;
  const labels = name.split('.');
  return labels.length >= 1 && labels.every((l) => label.test(l));
}
