import { z } from 'zod';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import { HutchError } from '../errors.js';
import {
  attach,
  type ChannelContext,
  download,
  execStream,
  type StreamContext,
  tty,
  upload,
} from './machine-channels.js';
import {
  attachQuery,
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
  uploadResultSchema,
} from './schemas.js';

export interface RouteContext {
  engine: Engine;
  act: Actions;
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

/**
 * A route that streams: its handler reads the request and writes the response itself (or
 * returns a value, sent as JSON with `status`). `openapi` documents what the schemas cannot.
 */
export interface StreamRoute {
  method: 'GET' | 'POST';
  path: string;
  summary: string;
  /** A JSON body, read (at most 1 MiB) and handed over as ctx.body; absent: the handler reads. */
  body?: z.ZodType;
  status: number;
  openapi: { parameters?: unknown[]; requestBody?: unknown; responses: Record<string, unknown> };
  handle: (ctx: StreamContext) => Promise<unknown>;
}

/** A WebSocket channel (GET + Upgrade); documented in OpenAPI as a GET answering 101. */
export interface ChannelRoute {
  path: string;
  summary: string;
  description: string;
  parameters?: unknown[];
  handle: (ctx: ChannelContext) => Promise<void>;
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
    handle: ({ act, body }) => {
      const b = parseWith(createMachineBody, body ?? {});
      return act.create({
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
    handle: ({ act }) => ({ machines: act.list() }),
  },
  {
    method: 'GET',
    path: '/v1/machines/{id}',
    summary: 'Fetch one machine (by id or name)',
    response: machineSchema,
    status: 200,
    handle: ({ act, params }) => act.get(params.id ?? ''),
  },
  {
    method: 'DELETE',
    path: '/v1/machines/{id}',
    summary: 'Destroy a machine now',
    status: 204,
    handle: async ({ act, params }) => {
      await act.destroy(params.id ?? '');
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
    handle: ({ act, params, body }) => {
      const b = parseWith(execBody, body);
      return act.exec(params.id ?? '', {
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
    handle: ({ act, params, body }) => {
      const b = parseWith(branchBody, body ?? {});
      return act.branch(params.id ?? '', {
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
    handle: ({ act, params }) => act.pause(params.id ?? ''),
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/resume',
    summary: 'Resume a paused or suspended machine',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ act, params }) => act.resume(params.id ?? ''),
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/suspend',
    summary: 'Suspend: write the machine to disk and free its memory',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ act, params }) => act.suspend(params.id ?? ''),
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/auto-suspend',
    summary: 'Set the idle auto-suspend timeout (0 disables)',
    body: autoSuspendBody,
    response: machineSchema,
    status: 200,
    handle: ({ act, params, body }) =>
      act.setAutoSuspend(params.id ?? '', parseWith(autoSuspendBody, body).seconds),
  },
];

const binary = { schema: { type: 'string', contentMediaType: 'application/octet-stream' } };

/** The machines API's streaming routes: live exec output and file transfer. */
export const machineStreamRoutes: StreamRoute[] = [
  {
    method: 'POST',
    path: '/v1/machines/{id}/exec/stream',
    summary: 'Run a command and stream its output as it arrives (NDJSON)',
    body: execBody,
    status: 200,
    openapi: {
      responses: {
        '200': {
          description:
            'One JSON object per line, as output arrives: {"type":"stdout"|"stderr","data"} (data is the ' +
            'text when the bytes are valid UTF-8, else their base64 with "encoding":"base64"; a UTF-8 ' +
            'sequence is never split across lines), then {"type":"exit","exit_code","signal","timed_out",' +
            '"duration_ms"}, or {"type":"error","code","message"} if the machine went away. Closing the ' +
            'connection kills the command.',
          content: { 'application/x-ndjson': { schema: { type: 'string' } } },
        },
      },
    },
    handle: execStream,
  },
  {
    method: 'POST',
    path: '/v1/machines/{id}/upload',
    summary: 'Upload a file to /root/<X-Filename> (the request body, streamed)',
    status: 200,
    openapi: {
      parameters: [
        {
          name: 'X-Filename',
          in: 'header',
          required: true,
          description:
            'File name in /root, percent-encoded if not ASCII; one path component (no "/", "..", NUL).',
          schema: { type: 'string' },
        },
      ],
      requestBody: { required: true, content: { 'application/octet-stream': binary } },
      responses: {
        '200': {
          description: 'Written (atomically: a temporary file renamed into place)',
          content: { 'application/json': { schema: z.toJSONSchema(uploadResultSchema) } },
        },
      },
    },
    handle: upload,
  },
  {
    method: 'GET',
    path: '/v1/machines/{id}/download',
    summary: 'Download a file from the machine (streamed)',
    status: 200,
    openapi: {
      parameters: [
        {
          name: 'path',
          in: 'query',
          required: true,
          description: 'Absolute path in the machine.',
          schema: { type: 'string' },
        },
      ],
      responses: {
        '200': {
          description: 'The file; content-length when the size is known up front',
          content: { 'application/octet-stream': binary },
        },
      },
    },
    handle: download,
  },
];

const attachParameters = Object.entries(attachQuery.shape).map(([name, schema]) => ({
  name,
  in: 'query',
  required: false,
  description: schema.description,
  schema: z.toJSONSchema(schema, { io: 'input' }),
}));

/** The machines API's WebSocket channels. */
export const machineChannelRoutes: ChannelRoute[] = [
  {
    path: '/v1/machines/{id}/tty',
    summary: 'WebSocket: the serial console (bytes to and from the guest /dev/ttyS0)',
    description:
      'Binary frames both ways (text frames from the client are typed as their UTF-8 bytes). A new ' +
      'viewer first gets the recent output, then live output; any number of viewers. Closes with ' +
      '1001 and a reason when the machine goes away.',
    handle: tty,
  },
  {
    path: '/v1/machines/{id}/attach',
    summary: 'WebSocket: an interactive shell on a PTY',
    description:
      'Binary frames: raw terminal I/O. Text frames: JSON control; client to server ' +
      '{"type":"resize","cols","rows"}; server to client {"type":"exit","code"} (then close 1000). ' +
      'Closing the socket kills the shell; 1001 with a reason when the machine goes away.',
    parameters: attachParameters,
    handle: attach,
  },
];
