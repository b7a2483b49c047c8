import type { Server } from 'node:http';
import { anonymousFor } from '../auth/listener-policy.js';
import type { Log } from '../background.js';
import { actionsFor } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import type { ApiCaller } from './api-caller.js';
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
    caller: ApiCaller;
    /** For TCP listeners: whether a token-less request there acts as the admin (listener-policy.ts). */
    auth: { requireAuth?: boolean | undefined; owner: string };
    log: Log;
    version: string;
    limits?: RequestLimits;
  },
): Promise<BoxesApi> {
  const { caller } = opts;
  const api = createApiServer(
    boxRoutes,
    (p) => ({
      engine,
      act: p ? actionsFor(engine, p, opts.log) : caller.nobody,
      version: opts.version,
    }),
    { limits: opts.limits, verifyBearer: (h) => caller.auth.verifyBearer(h) },
  );
  const endpoints: string[] = [];
  // The socket's file permissions are its credential: whoever can open it is the local admin.
  if (opts.socketPath)
    endpoints.push(
      await api.listenUnix(opts.socketPath, () => caller.auth.principalFor(opts.auth.owner, 'socket')),
    );
  if (opts.listen) {
    const i = opts.listen.lastIndexOf(':');
    const host = i > 0 ? opts.listen.slice(0, i) : '127.0.0.1';
    const port = Number(i >= 0 ? opts.listen.slice(i + 1) : opts.listen);
    endpoints.push(await api.listenTcp(host, port, anonymousFor(host, opts.auth, caller.auth)));
  }
  return { servers: api.servers, endpoints, close: () => api.close() };
}
