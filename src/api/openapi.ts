import { z } from 'zod';
import { errorTable } from '../errors.js';
import { boxRoutes } from './boxes-routes.js';
import { machineChannelRoutes, machineRoutes, machineStreamRoutes, type Route } from './routes.js';
import { errorSchema } from './schemas.js';

/** The OpenAPI 3.1 document, generated from the same route table and schemas the server uses. */
export function openApiDocument(): Record<string, unknown> {
  return document('hutch machines API', machineRoutes, machineStreamingPaths);
}

/** The boxes API (REST /v1/boxes over the Unix socket or TCP), served as spec/boxes-openapi.json. */
export function boxesOpenApiDocument(): Record<string, unknown> {
  return document('hutch boxes API', boxRoutes, () => {});
}

type DocRoute = Pick<Route, 'method' | 'path' | 'summary' | 'body' | 'response' | 'status'>;

type Paths = Record<string, Record<string, unknown>>;

function document(title: string, routes: DocRoute[], more: (paths: Paths) => void): Record<string, unknown> {
  const paths: Paths = {};
  const errorJson = z.toJSONSchema(errorSchema);
  for (const r of routes) {
    const params = [...r.path.matchAll(/\{(\w+)\}/g)].map((m) => ({
      name: m[1],
      in: 'path',
      required: true,
      schema: { type: 'string' },
    }));
    const op: Record<string, unknown> = {
      summary: r.summary,
      responses: {
        [String(r.status)]: r.response
          ? {
              description: 'OK',
              content: { 'application/json': { schema: z.toJSONSchema(r.response, { io: 'output' }) } },
            }
          : { description: 'Done' },
        default: { description: 'Error', content: { 'application/json': { schema: errorJson } } },
      },
    };
    if (params.length) op.parameters = params;
    if (r.body)
      op.requestBody = {
        required: true,
        content: { 'application/json': { schema: z.toJSONSchema(r.body, { io: 'input' }) } },
      };
    paths[r.path] ??= {};
    const entry = paths[r.path];
    if (entry) entry[r.method.toLowerCase()] = op;
  }
  more(paths);
  return {
    openapi: '3.1.0',
    info: {
      title,
      version: '1',
      description: `Errors are {"code","message"}. Codes: ${Object.keys(errorTable).join(', ')}.`,
    },
    paths,
  };
}

/** The machines API's streaming (NDJSON, raw bodies) and WebSocket routes. */
function machineStreamingPaths(paths: Paths): void {
  const errorJson = z.toJSONSchema(errorSchema);
  const pathParams = (path: string): unknown[] =>
    [...path.matchAll(/\{(\w+)\}/g)].map((m) => ({
      name: m[1],
      in: 'path',
      required: true,
      schema: { type: 'string' },
    }));
  const errors = {
    default: { description: 'Error', content: { 'application/json': { schema: errorJson } } },
  };
  for (const r of machineStreamRoutes) {
    const op: Record<string, unknown> = {
      summary: r.summary,
      parameters: [...pathParams(r.path), ...(r.openapi.parameters ?? [])],
      responses: { ...r.openapi.responses, ...errors },
    };
    if (r.body)
      op.requestBody = {
        required: true,
        content: { 'application/json': { schema: z.toJSONSchema(r.body, { io: 'input' }) } },
      };
    else if (r.openapi.requestBody) op.requestBody = r.openapi.requestBody;
    paths[r.path] ??= {};
    const entry = paths[r.path];
    if (entry) entry[r.method.toLowerCase()] = op;
  }
  for (const r of machineChannelRoutes) {
    paths[r.path] ??= {};
    const entry = paths[r.path];
    if (entry)
      entry.get = {
        summary: r.summary,
        description: r.description,
        parameters: [...pathParams(r.path), ...(r.parameters ?? [])],
        responses: {
          '101': { description: 'Switching Protocols: the WebSocket is open' },
          '426': { description: 'Upgrade Required: a plain GET on a WebSocket endpoint' },
          ...errors,
        },
      };
  }
}
