import { z } from 'zod';
import { errorTable } from '../errors.js';
import { boxRoutes } from './boxes-routes.js';
import { machineRoutes, type Route } from './routes.js';
import { errorSchema } from './schemas.js';

/** The OpenAPI 3.1 document, generated from the same route table and schemas the server uses. */
export function openApiDocument(): Record<string, unknown> {
  return document('hutch machines API', machineRoutes);
}

/** The boxes API (REST /v1/boxes over the Unix socket or TCP), served as spec/boxes-openapi.json. */
export function boxesOpenApiDocument(): Record<string, unknown> {
  return document('hutch boxes API', boxRoutes);
}

type DocRoute = Pick<Route, 'method' | 'path' | 'summary' | 'body' | 'response' | 'status'>;

function document(title: string, routes: DocRoute[]): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
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
