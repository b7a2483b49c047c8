import { isIP } from 'node:net';
import { decodePathSegment } from '../../api/http/match.js';
import { HutchError } from '../../errors.js';

/**
 * Which requests are previews, and of what: by path (`/v1/machines/{id}/web/{port}/…`, on any
 * listener) or, with a public domain, by Host. Pure parsing; nothing is looked up here.
 */

/** A preview addressed by its path. */
export interface PathTarget {
  kind: 'path';
  /** The machine's id or name, as the URL has it (decoded). */
  machine: string;
  port: number;
  /** `/v1/machines/{id}/web/{port}` as the URL has it (encoded). */
  prefix: string;
  /** What the guest is asked for: the rest of the path (at least `/`) and the query. */
  path: string;
}

/** Addressed by Host under the public domain or a bound domain. */
export type HostTarget =
  | { kind: 'port-host'; machine: string; port: number }
  | { kind: 'proxy'; name: string }
  | { kind: 'domain'; domain: string };

const previewPath = /^\/v1\/machines\/([^/:]+)\/web\/([^/]*)(\/.*)?$/;

/**
 * The preview a request path names: undefined when it is not a preview path (the API routes
 * it), 'redirect' for `…/web/{port}` without its slash, and a target otherwise. `PUT
 * …/web/{port}/public` is the API's. A port that is not 1–65535 in plain digits is a 400.
 */
export function pathTarget(
  method: string,
  pathname: string,
  search: string,
): PathTarget | { kind: 'redirect'; location: string } | undefined {
  const m = previewPath.exec(pathname);
  if (!m) return undefined;
  const [, rawMachine = '', rawPort = '', rest] = m;
  if (rest === '/public' && method === 'PUT') return undefined;
  const port = parsePort(decodePathSegment(rawPort));
  const machine = decodePathSegment(rawMachine);
  const prefix = `/v1/machines/${rawMachine}/web/${rawPort}`;
  if (rest === undefined) return { kind: 'redirect', location: `${prefix}/${search}` };
  return { kind: 'path', machine, port, prefix, path: `${rest}${search}` };
}

/** A port as a URL segment or Host label gives it: 1–65535, digits only, no leading zero. */
export function parsePort(s: string): number {
  if (!/^[1-9][0-9]{0,4}$/.test(s) || Number(s) > 65535)
    throw new HutchError('INVALID_ARGUMENT', `not a port (1-65535): ${JSON.stringify(s.slice(0, 40))}`);
  return Number(s);
}

/** The host name of a Host header: lower case, no port, no trailing dot. */
export function hostName(host: string | undefined): string | undefined {
  if (host === undefined || host === '') return undefined;
  const h = host.trim().toLowerCase();
  const name = h.startsWith('[') ? h.slice(0, h.indexOf(']') + 1) : h.replace(/:\d*$/, '');
  return name.replace(/\.$/, '');
}

const portHost = /^([0-9]{1,5})-([a-z0-9][a-z0-9-]*)$/;

/**
 * What a Host routes to: a label under `publicDomain` (`{port}-{machine id}`, else a proxy
 * name), or a bound domain (looked up by the caller, `isDomain`). Undefined: the Host is the
 * API's. Addresses, `localhost` and the public domain itself are always the API's, so no bound
 * domain can take the API over.
 */
export function hostTarget(
  host: string | undefined,
  publicDomain: string,
  isDomain: (name: string) => boolean,
): HostTarget | undefined {
  const name = hostName(host);
  if (
    name === undefined ||
    name === publicDomain ||
    name === 'localhost' ||
    isIP(name.replace(/^\[|\]$/g, ''))
  )
    return undefined;
  if (name.endsWith(`.${publicDomain}`)) {
    const label = name.slice(0, -publicDomain.length - 1);
    const m = portHost.exec(label);
    if (m) {
      const port = Number(m[1]);
      if (port >= 1 && port <= 65535 && !m[1]?.startsWith('0'))
        return { kind: 'port-host', machine: m[2] as string, port };
    }
    // Not a label this server made: under the domain it is still never the API's (404 later).
    return { kind: 'proxy', name: label };
  }
  return isDomain(name) ? { kind: 'domain', domain: name } : undefined;
}
