import type { Server } from 'node:http';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import type { RequestLimits } from './http/request-guard.js';
import { createApiServer } from './http/server.js';
import { openApiDocument } from './openapi.js';
import { machineRoutes } from './routes.js';

export interface HttpApi {
  server: Server;
  url: string;
  close(): Promise<void>;
}

/** The machines API on TCP, with its OpenAPI document at /openapi.json. */
export async function startHttpApi(
  engine: Engine,
  opts: { host: string; port: number; act: Actions; limits?: RequestLimits },
): Promise<HttpApi> {
  const api = createApiServer(
    machineRoutes,
    { engine, act: opts.act },
    { limits: opts.limits, openapi: JSON.stringify(openApiDocument()) },
  );
  const url = await api.listenTcp(opts.host, opts.port);
  return { server: api.servers[0] as Server, url, close: () => api.close() };
}
