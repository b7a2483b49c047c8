import { z } from 'zod';
import { errorTable } from '../errors.js';
import { boxRoutes } from './boxes-routes.js';
import type { ApiRoute } from './http/routes.js';
import { machineRoutes } from './routes.js';
import { errorSchema } from './schemas.js';

/** The OpenAPI 3.1 document, generated from the same route table and schemas the server uses. */
export function openApiDocument(): Record<string, unknown> {
  return document('hutch machines API', machineRoutes);
}

/** The boxes API (REST /v1/boxes over the Unix socket or TCP), served as spec/boxes-openapi.json. */
export function boxesOpenApiDocument(): Record<string, unknown> {
  return document('hutch boxes API', boxRoutes);
}

type Paths = Record<string, Record<string, unknown>>;

function document<A>(title: string, routes: ApiRoute<A>[]): Record<string, unknown> {
  const paths: Paths = {};
  const errors = {
    default: {
      description: 'Error',
      content: { 'application/json': { schema: z.toJSONSchema(errorSchema) } },
    },
  };
  for (const r of routes) {
    const params = [...pathParameters(r.path), ...queryParameters(r.query)];
    const jsonBody = r.body && {
      required: true,
      content: { 'application/json': { schema: z.toJSONSchema(r.body, { io: 'input' }) } },
    };
    let op: Record<string, unknown>;
    switch (r.kind) {
      case 'json':
        op = {
          summary: r.summary,
          ...(r.description ? { description: r.description } : {}),
          responses: {
            [String(r.status)]: r.response
              ? {
                  description: 'OK',
                  content: { 'application/json': { schema: z.toJSONSchema(r.response, { io: 'output' }) } },
                }
              : { description: 'Done' },
            ...errors,
          },
          ...(params.length ? { parameters: params } : {}),
          ...(jsonBody ? { requestBody: jsonBody } : {}),
        };
        break;
      case 'ndjson':
      case 'sse':
      case 'raw': {
        const requestBody = jsonBody ?? r.doc.requestBody;
        op = {
          summary: r.summary,
          ...(r.description ? { description: r.description } : {}),
          parameters: [...params, ...(r.doc.parameters ?? [])],
          responses: { ...r.doc.responses, ...errors },
          ...(requestBody ? { requestBody } : {}),
        };
        break;
      }
      case 'websocket':
        op = {
          summary: r.summary,
          description: r.description,
          parameters: params,
          responses: {
            '101': { description: 'Switching Protocols: the WebSocket is open' },
            '426': { description: 'Upgrade Required: a plain GET on a WebSocket endpoint' },
            ...errors,
          },
        };
        break;
    }
    // OpenAPI has no rest-of-path parameter: `{id+}` is written `{id}`.
    const key = r.path.replace(/\{(\w+)\+\}/g, '{$1}');
    paths[key] ??= {};
    const entry = paths[key];
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

function pathParameters(path: string): unknown[] {
  return [...path.matchAll(/\{(\w+)\+?\}/g)].map((m) => ({
    name: m[1],
    in: 'path',
    required: true,
    schema: { type: 'string' },
  }));
}

/** A query schema's fields as OpenAPI query parameters (optional when absent is valid). */
function queryParameters(query: z.ZodObject | undefined): unknown[] {
  if (!query) return [];
  return Object.entries(query.shape).map(([name, schema]) => ({
    name,
    in: 'query',
    required: !schema.safeParse(undefined).success,
    description: schema.description,
    schema: z.toJSONSchema(schema, { io: 'input' }),
  }));
}
