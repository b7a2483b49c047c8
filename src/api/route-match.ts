/**
 * Path matching shared by the route tables. `{name}` matches one path segment and stops at ":",
 * so custom methods written the Google-API way (`/v1/boxes/{id}:stop`) route as the spec writes
 * them; ids and names never contain ":".
 */
export interface CompiledRoute<R> {
  route: R;
  regex: RegExp;
  names: string[];
}

export function compileRoutes<R extends { path: string }>(routes: R[]): CompiledRoute<R>[] {
  return routes.map((route) => {
    const names: string[] = [];
    const pattern = route.path.replace(/\{(\w+)\}/g, (_, n: string) => {
      names.push(n);
      return '([^/:]+)';
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
      params[n] = decodeURIComponent(m[i + 1] ?? '');
    });
    return { route: c.route, params };
  }
  return pathMatched ? 'method' : undefined;
}
