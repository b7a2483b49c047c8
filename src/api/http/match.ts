import { HutchError } from '../../errors.js';

/**
 * Path matching shared by the route tables. `{name}` matches one path segment and stops at ":",
 * so custom methods written the Google-API way (`/v1/boxes/{id}:stop`) route as the spec writes
 * them; ids and names never contain ":". `{name+}`, last in a path, is the rest of it, slashes and
 * colons included (model ids such as `vendor/model:free`).
 */
export interface CompiledRoute<R> {
  route: R;
  regex: RegExp;
  names: string[];
}

export function compileRoutes<R extends { path: string }>(routes: R[]): CompiledRoute<R>[] {
  return routes.map((route) => {
    const names: string[] = [];
    const pattern = route.path.replace(/\{(\w+)(\+?)\}/g, (_, n: string, rest: string) => {
      names.push(n);
      return rest ? '(.+)' : '([^/:]+)';
    });
    return { route, regex: new RegExp(`^${pattern}$`), names };
  });
}

/**
 * The route for a request: its parameters decoded; `method` when the path exists only with
 * other methods (405); undefined when no route has the path (404).
 */
export function matchRoute<R extends { path: string; method: string }>(
  compiled: CompiledRoute<R>[],
  method: string,
  pathname: string,
): { route: R; params: Record<string, string> } | 'method' | undefined {
  let pathMatched = false;
  for (const c of compiled) {
    const m = c.regex.exec(pathname);
    if (!m) continue;
    pathMatched = true;
    if (c.route.method !== method) continue;
    const params: Record<string, string> = {};
    c.names.forEach((n, i) => {
      params[n] = decodePathSegment(m[i + 1] ?? '');
    });
    return { route: c.route, params };
  }
  return pathMatched ? 'method' : undefined;
}

/**
 * A percent-decoded path parameter. A malformed escape (`%zz`, a cut or invalid UTF-8 sequence)
 * is the client's mistake, so it is a 400, not the URIError decodeURIComponent throws.
 */
export function decodePathSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new HutchError(
      'INVALID_ARGUMENT',
      `malformed percent-escape in the path: ${JSON.stringify(segment.slice(0, 200))}`,
    );
  }
}

/**
 * The URL of a request. An origin-form target (`/…`) is always a path, so `//x/…` does not turn
 * `x` into a host; a target no URL parser accepts is a 400 wherever it is parsed (a throw in an
 * `upgrade` listener would otherwise escape every handler).
 */
export function requestUrl(target: string | undefined): URL {
  const raw = target ?? '/';
  // URL parsing would resolve them (`/v1/machines/../disks` is `/v1/disks`): a request names
  // the route it asks for, never another one by way of dot segments.
  const path = raw.split('?')[0] ?? '';
  if (path.split('/').some((seg) => /^(?:\.|%2e){1,2}$/i.test(seg)))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `a path may not have "." or ".." segments: ${JSON.stringify(path.slice(0, 200))}`,
    );
  try {
    return raw.startsWith('/') ? new URL(`http://localhost${raw}`) : new URL(raw, 'http://localhost');
  } catch {
    throw new HutchError(
      'INVALID_ARGUMENT',
      `not a valid request target: ${JSON.stringify(raw.slice(0, 200))}`,
    );
  }
}
