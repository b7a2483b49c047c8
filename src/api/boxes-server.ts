import type { Server } from 'node:http';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import { boxRoutes } from './boxes-routes.js';
import type { RequestLimits } from './http/request-guard.js';
import { createApiServer } from './http/server.js';

export interface BoxesApi {
  servers: Server[];
  /** `unix:<path>` and/or `http://host:port`. */
  endpoints: string[];
  close(): Promise<void>;
}

/**
 * The boxes API on a Unix socket (owner-only: whoever can open it has full control of the
 * boxes) and optionally on TCP (`host:port`, or a port on 127.0.0.1): one server, two listeners.
 */
export async function startBoxesApi(
  engine: Engine,
  opts: {
    socketPath: string | null;
    listen?: string | undefined;
    act: Actions;
    version: string;
    limits?: RequestLimits;
  },
): Promise<BoxesApi> {
  const api = createApiServer(
    boxRoutes,
    { engine, act: opts.act, version: opts.version },
    { limits: opts.limits },
  );
  const endpoints: string[] = [];
  if (opts.socketPath) endpoints.push(await api.listenUnix(opts.socketPath));
  if (opts.listen) {
    const i = opts.listen.lastIndexOf(':');
    const host = i > 0 ? opts.listen.slice(0, i) : '127.0.0.1';
    const port = Number(i >= 0 ? opts.listen.slice(i + 1) : opts.listen);
    endpoints.push(await api.listenTcp(host, port));
  }
  return { servers: api.servers, endpoints, close: () => api.close() };
}
