import type { z } from 'zod';
import type { Engine } from '../engine/engine.js';
import { HutchError } from '../errors.js';
import {
  autoSuspendBody,
  branchBody,
  branchResultSchema,
  createMachineBody,
  execBody,
  execResultSchema,
  healthSchema,
  lifecycleResultSchema,
  machineListSchema,
  machineSchema,
} from './schemas.js';

export interface RouteContext {
  engine: Engine;
  owner: string;
  params: Record<string, string>;
  body: unknown;
}

export interface Route {
  method: 'GET' | 'POST' | 'DELETE';
  /** Path with {param} segments, as in OpenAPI. */
  path: string;
  summary: string;
  body?: z.ZodType;
  response?: z.ZodType;
  status: number;
  handle: (ctx: RouteContext) => Promise<unknown> | unknown;
}

/** Parses with a schema, turning failures into one INVALID_ARGUMENT with every problem listed. */
export function parseWith<T extends z.ZodType>(schema: T, value: unknown): z.infer<T> {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const issues = r.error.issues
    .map((i) => `${i.path.length ? i.path.join('.') : 'body'}: ${i.message}`)
    .join('; ');
  throw new HutchError('INVALID_ARGUMENT', issues);
}

/**
 * The machines API: each route parses, calls one engine method and returns its result. No logic
 * lives here (Firecracker's split): behaviour is the engine's, so every API surface gets the same.
 */
export const machineRoutes: Route[] = [
  {
    method: 'GET',
    path: '/healthz',
    summary: 'Liveness, running count, accelerator and template readiness',
    response: healthSchema,
    status: 200,
    handle: ({ engine }) => engine.health(),
  },
  {
    method: 'POST',
    path: '/v1/machines',
    summary: 'Boot a machine',
    body: createMachineBody,
    response: machineSchema,
    status: 201,
    handle: ({ engine, owner, body }) => {
      const b = parseWith(createMachineBody, body ?? {});
      return engine.create(owner, {
        template: b.template,
        ...(b.ttl_seconds !== undefined ? { ttlSeconds: b.ttl_seconds } : {}),
        ...(b.persistent !== undefined ? { persistent: b.persistent } : {}),
        ...(b.name !== undefined ? { name: b.name } : {}),
        ...(b.net !== undefined ? { net: b.net } : {}),
        ...(b.mode !== undefined ? { mode: b.mode } : {}),
        ...(b.auto_suspend_seconds !== undefined ? { autoSuspendSeconds: b.auto_suspend_seconds } : {}),
      });
    },
  },
  {
    method: 'GET',
    path: '/v1/machines',
    summary: 'List machines',
    response: machineListSchema,
    status: 200,
    handle: ({ engine, owner }) => ({ machines: engine.list(owner) }),
  },
  {
    method: 'GET',
    path: '/v1/machines/{id}',
    summary: 'Fetch one machine (by id or name)',
    response: machineSchema,
    status: 200,
    handle: ({ engine, owner, params }) => engine.get(owner, params.id ?? ''),
  },
  {
    method: 'DELETE',
    path: '/v1/machines/{id}',
    summary: 'Destroy a machine now',
    status: 204,
    handle: async ({ engine, owner, params }) => {
      await engine.destroy(owner, params.id ?? '');
      return undefined;
    },
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/exec',
    summary: 'Run a command and wait for its result',
    body: execBody,
    response: execResultSchema,
    status: 200,
    handle: ({ engine, owner, params, body }) => {
      const b = parseWith(execBody, body);
      return engine.exec(owner, params.id ?? '', {
        argv: typeof b.cmd === 'string' ? ['/bin/sh', '-c', b.cmd] : b.cmd,
        ...(b.env ? { env: b.env } : {}),
        ...(b.cwd ? { cwd: b.cwd } : {}),
        ...(b.stdin !== undefined ? { stdin: b.stdin } : {}),
        timeoutMs: b.timeout_ms ?? 60_000,
      });
    },
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/branch',
    summary: 'Fork a running machine into a live clone',
    body: branchBody,
    response: branchResultSchema,
    status: 201,
    handle: ({ engine, owner, params, body }) => {
      const b = parseWith(branchBody, body ?? {});
      return engine.branch(owner, params.id ?? '', {
        ...(b.name !== undefined ? { name: b.name } : {}),
        ...(b.ttl_seconds !== undefined ? { ttlSeconds: b.ttl_seconds } : {}),
      });
    },
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/pause',
    summary: 'Pause: stop the vCPUs, keep everything in memory',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ engine, owner, params }) => engine.pause(owner, params.id ?? ''),
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/resume',
    summary: 'Resume a paused or suspended machine',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ engine, owner, params }) => engine.resume(owner, params.id ?? ''),
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/suspend',
    summary: 'Suspend: write the machine to disk and free its memory',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ engine, owner, params }) => engine.suspend(owner, params.id ?? ''),
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/auto-suspend',
    summary: 'Set the idle auto-suspend timeout (0 disables)',
    body: autoSuspendBody,
    response: machineSchema,
    status: 200,
    handle: ({ engine, owner, params, body }) =>
      engine.setAutoSuspend(owner, params.id ?? '', parseWith(autoSuspendBody, body).seconds),
  },
];
