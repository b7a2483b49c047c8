import { HutchError } from '../errors.js';

/** An OCI image reference split into its parts, with Docker's defaults applied. */
export interface ImageRef {
  registry: string;
  repository: string;
  /** `latest` when the reference names neither a tag nor a digest. */
  tag?: string;
  digest?: string;
  /** registry/repository[:tag][@digest], e.g. docker.io/library/debian:bookworm. */
  canonical: string;
}

// The grammar of github.com/distribution/reference, without IPv6 literals.
const domainComponent = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const domainRe = new RegExp(`^${domainComponent}(?:\\.${domainComponent})*(?::[0-9]{1,5})?$`);
const pathComponentRe = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const tagRe = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const digestRe = /^sha256:[a-f0-9]{64}$/;

const invalid = (ref: string, why: string): HutchError =>
  new HutchError('INVALID_ARGUMENT', `invalid image reference ${JSON.stringify(ref)}: ${why}`);

/**
 * Parses `[registry/]repository[:tag][@sha256:…]` as Docker does: a first component with a dot
 * or a port, or `localhost`, is a registry; otherwise the registry is docker.io, where a single
 * component gets `library/`. Throws INVALID_ARGUMENT on anything malformed.
 */
export function parseImageRef(ref: string): ImageRef {
  if (typeof ref !== 'string' || ref.length === 0) throw invalid(String(ref), 'empty');
  if (ref.length > 512) throw invalid(`${ref.slice(0, 40)}…`, 'too long');
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!digestRe.test(digest)) throw invalid(ref, 'a digest must be sha256: and 64 lowercase hex digits');
  }
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!tagRe.test(tag)) throw invalid(ref, `bad tag ${JSON.stringify(tag)}`);
  }
  const parts = rest.split('/');
  let registry = 'docker.io';
  const first = parts[0] ?? '';
  if (parts.length > 1 && (first.includes('.') || first.includes(':') || first === 'localhost')) {
    if (!domainRe.test(first)) throw invalid(ref, `bad registry ${JSON.stringify(first)}`);
    registry = first === 'index.docker.io' ? 'docker.io' : first;
    parts.shift();
  }
  if (parts.length === 0 || parts.some((p) => !pathComponentRe.test(p)))
    throw invalid(ref, 'the repository must be lowercase components of letters, digits and . _ -');
  if (registry === 'docker.io' && parts.length === 1) parts.unshift('library');
  const repository = parts.join('/');
  if (registry.length + 1 + repository.length > 255) throw invalid(ref, 'the name is longer than 255');
  if (!tag && !digest) tag = 'latest';
  const canonical = `${registry}/${repository}${tag ? `:${tag}` : ''}${digest ? `@${digest}` : ''}`;
  return { registry, repository, ...(tag ? { tag } : {}), ...(digest ? { digest } : {}), canonical };
}

/** Registries hutch talks to over plain HTTP (or unverified TLS) unless configured otherwise. */
export const defaultInsecureRegistries: readonly string[] = ['localhost', '127.0.0.1'];

/** Whether `registry` (host or host:port) is in `insecure`, where a bare host matches any port. */
export function isInsecureRegistry(registry: string, insecure: readonly string[]): boolean {
  const host = registry.replace(/:[0-9]+$/, '');
  return insecure.includes(registry) || insecure.includes(host);
}
