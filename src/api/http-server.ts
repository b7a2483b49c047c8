import type { Server } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Log } from '../background.js';
import { actionsFor } from '../core/dispatch.js';
import type { Principal } from '../core/principal.js';
import type { Engine } from '../engine/engine.js';
import type { PreviewProxy } from '../net/preview/preview-proxy.js';
import type { ApiCaller } from './api-caller.js';
import type { RequestLimits, TlsFiles } from './http/request-guard.js';
import { createApiServer } from './http/server.js';
import { openApiDocument } from './openapi.js';
import { machineRoutes } from './routes.js';

export interface HttpApi {
  server: Server;
  url: string;
  /** Serves the machines API on a guest's API tunnel, every request acting as `principal`. */
  acceptConnection(stream: Duplex, principal: Principal): void;
  close(): Promise<void>;
}

/**
 * The machines API on TCP (HTTPS with `tls`), with its OpenAPI document at /openapi.json and the
 * web previews in front of its routes when `previews` is given. `caller.anonymous` is whom a
 * request without a token acts as (the local admin on a loopback listener); without it every
 * request needs a bearer token.
 */
export async function startHttpApi(
  engine: Engine,
  opts: {
    host: string;
    port: number;
    caller: ApiCaller;
    log: Log;
    limits?: RequestLimits;
    previews?: PreviewProxy | undefined;
    tls?: TlsFiles | undefined;
  },
): Promise<HttpApi> {
  const { caller, previews } = opts;
  const api = createApiServer(
    machineRoutes,
    (p) => ({
      engine,
      auth: caller.auth,
      me: p,
      act: p ? actionsFor(engine, p, opts.log) : caller.nobody,
      previews,
    }),
    {
      limits: opts.limits,
      openapi: JSON.stringify(openApiDocument()),
      verifyBearer: (h) => caller.auth.verifyBearer(h),
      front: previews,
    },
  );
  const url = await api.listenTcp(opts.host, opts.port, caller.anonymous, opts.tls);
  return {
    server: api.servers[0] as Server,
    url,
    acceptConnection: (stream, principal) => api.acceptConnection(stream, principal),
    close: () => api.close(),
  };
}
