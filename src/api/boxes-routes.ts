import { posix } from 'node:path';
import type { z } from 'zod';
import type { Actions } from '../core/dispatch.js';
import type { Engine } from '../engine/engine.js';
import { HutchError } from '../errors.js';
import {
  boxExecBody,
  boxListSchema,
  boxSchema,
  createBoxBody,
  downloadBody,
  execListSchema,
  execSchema,
  gcBody,
  gcResultSchema,
  infoSchema,
  runBody,
  runResultSchema,
  uploadResultSchema,
} from './boxes-schemas.js';
import { parseWith } from './routes.js';

export interface BoxRouteContext {
  engine: Engine;
  act: Actions;
  params: Record<string, string>;
  query: URLSearchParams;
  body: unknown;
  version: string;
}

/**
 * A route of the boxes API. `json` routes parse, call one engine method and answer JSON; the
 * other kinds move bytes (SSE, multipart, raw downloads, WebSocket terminals) in boxes-server.ts.
 */
export type BoxRoute = {
  method: 'GET' | 'POST' | 'DELETE';
  path: string;
  summary: string;
  status: number;
  body?: z.ZodType;
  response?: z.ZodType;
} & (
  | { kind: 'json'; handle: (ctx: BoxRouteContext) => Promise<unknown> | unknown }
  | { kind: 'events' | 'upload' | 'download' | 'attach' }
);

/** `dest` of an upload: absolute, no `..`; a trailing `/` means "this directory, the file's own name". */
export function uploadDest(dest: string, filename: string): string {
  if (!dest.startsWith('/') || dest.includes('\0') || dest.split('/').includes('..'))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `dest must be an absolute path without "..", got ${JSON.stringify(dest)}`,
    );
  if (!dest.endsWith('/')) return within(dest);
  const name = posix.basename(filename);
  if (!name || name === '.' || name === '..' || name.includes('\0'))
    throw new HutchError('INVALID_ARGUMENT', 'dest is a directory and the file part has no usable filename');
  return within(posix.join(dest, name));
}

/** A path the guest can take: at most PATH_MAX bytes (and the agent request stays one frame). */
function within(path: string): string {
  if (Buffer.byteLength(path) > 4096)
    throw new HutchError('INVALID_ARGUMENT', 'the destination path is longer than 4096 bytes');
  return path;
}

const status = (q: URLSearchParams): string | undefined => {
  const s = q.get('status');
  if (s === null) return undefined;
  if (s !== 'running' && s !== 'stopped')
    throw new HutchError('INVALID_ARGUMENT', `status must be running or stopped, got ${JSON.stringify(s)}`);
  return s;
};

const boolParam = (q: URLSearchParams, name: string): boolean => {
  const v = q.get(name);
  if (v === null || v === 'false' || v === '0') return false;
  if (v === 'true' || v === '1' || v === '') return true;
  throw new HutchError('INVALID_ARGUMENT', `${name} must be true or false`);
};

export const boxRoutes: BoxRoute[] = [
  {
    kind: 'json',
    method: 'POST',
    path: '/v1/boxes',
    summary: 'Create a box (pulls or builds its image, boots it)',
    body: createBoxBody,
    response: boxSchema,
    status: 201,
    handle: ({ act, body }) => {
      const b = parseWith(createBoxBody, body ?? {});
      return act.createBox({
        image: b.image,
        ...(b.name !== undefined ? { name: b.name } : {}),
        cpu: b.cpu,
        memoryMb: b.memory_mb,
        diskSizeGb: b.disk_size_gb,
        network: b.network,
        ...(b.workdir !== undefined ? { workdir: b.workdir } : {}),
        env: b.env,
        volumes: b.volumes,
      });
    },
  },
  {
    kind: 'json',
    method: 'GET',
    path: '/v1/boxes',
    summary: 'List boxes (?status=running|stopped)',
    response: boxListSchema,
    status: 200,
    handle: ({ act, query }) => ({ boxes: act.listBoxes(status(query)) }),
  },
  {
    kind: 'json',
    method: 'GET',
    path: '/v1/boxes/{id}',
    summary: 'Get a box by id or name',
    response: boxSchema,
    status: 200,
    handle: ({ act, params }) => act.getBox(params.id ?? ''),
  },
  {
    kind: 'json',
    method: 'POST',
    path: '/v1/boxes/{id}:stop',
    summary: 'Stop a box (its disk is kept)',
    response: boxSchema,
    status: 200,
    handle: ({ act, params }) => act.stopBox(params.id ?? ''),
  },
  {
    kind: 'json',
    method: 'POST',
    path: '/v1/boxes/{id}:start',
    summary: 'Start a stopped box again',
    response: boxSchema,
    status: 200,
    handle: ({ act, params }) => act.startBox(params.id ?? ''),
  },
  {
    kind: 'json',
    method: 'DELETE',
    path: '/v1/boxes/{id}',
    summary: 'Remove a box and its disk (?force=true for a running one)',
    status: 204,
    handle: async ({ act, params, query }) => {
      await act.removeBox(params.id ?? '', boolParam(query, 'force'));
      return undefined;
    },
  },
  {
    kind: 'json',
    method: 'POST',
    path: '/v1/boxes/{id}/exec',
    summary: 'Start a command; its output streams from /events',
    body: boxExecBody,
    response: execSchema,
    status: 201,
    handle: ({ act, params, body }) => {
      const b = parseWith(boxExecBody, body);
      return act.startExec(params.id ?? '', {
        cmd: b.cmd,
        ...(b.env ? { env: b.env } : {}),
        ...(b.workdir ? { workdir: b.workdir } : {}),
        ...(b.timeout_ms ? { timeoutMs: b.timeout_ms } : {}),
      });
    },
  },
  {
    kind: 'json',
    method: 'GET',
    path: '/v1/boxes/{id}/execs',
    summary: 'List the execs of a box',
    response: execListSchema,
    status: 200,
    handle: ({ act, params }) => ({ execs: act.listExecs(params.id ?? '') }),
  },
  {
    kind: 'json',
    method: 'GET',
    path: '/v1/boxes/{id}/exec/{eid}',
    summary: 'Get an exec',
    response: execSchema,
    status: 200,
    handle: ({ act, params }) => act.getExec(params.id ?? '', params.eid ?? ''),
  },
  {
    kind: 'events',
    method: 'GET',
    path: '/v1/boxes/{id}/exec/{eid}/events',
    summary:
      'Server-Sent Events: every `log` event from seq 1 (replayed), then live ones, then one `exit`; ' +
      'data is {"stream","data","seq"}, with "encoding":"base64" when the bytes are not UTF-8',
    status: 200,
  },
  {
    kind: 'json',
    method: 'POST',
    path: '/v1/boxes/{id}/exec/{eid}:cancel',
    summary: 'Cancel a running exec (a finished one is left as it is)',
    response: execSchema,
    status: 200,
    handle: ({ act, params }) => act.cancelExec(params.id ?? '', params.eid ?? ''),
  },
  {
    kind: 'upload',
    method: 'POST',
    path: '/v1/boxes/{id}/files/upload',
    summary: 'Upload a file: multipart/form-data with fields file and dest (a trailing / keeps the name)',
    response: uploadResultSchema,
    status: 200,
  },
  {
    kind: 'download',
    method: 'POST',
    path: '/v1/boxes/{id}/files/download',
    summary: 'Download a file: {"path"} → its bytes (application/octet-stream)',
    body: downloadBody,
    status: 200,
  },
  {
    kind: 'attach',
    method: 'GET',
    path: '/v1/boxes/{id}/attach',
    summary:
      'WebSocket terminal (?shell=/bin/bash&cols=80&rows=24&term=xterm-256color): binary frames are raw ' +
      'terminal I/O; text frames JSON: {"type":"resize","cols","rows"} in, {"type":"exit","code"} out',
    status: 101,
  },
  {
    kind: 'json',
    method: 'GET',
    path: '/v1/info',
    summary: 'Server limits',
    response: infoSchema,
    status: 200,
    handle: ({ engine, version }) => ({
      ...engine.boxLimits(),
      accel: engine.health().accel,
      version,
      disk: engine.diskRoom(),
    }),
  },
  {
    kind: 'json',
    method: 'POST',
    path: '/v1/run',
    summary: 'Ephemeral run: create a box, run one command, return its output, remove the box',
    body: runBody,
    response: runResultSchema,
    status: 200,
    handle: ({ act, body }) => {
      const b = parseWith(runBody, body);
      return act.runOnce({
        image: b.image,
        cmd: b.cmd,
        cpu: b.cpu,
        memoryMb: b.memory_mb,
        diskSizeGb: 8,
        network: b.network,
        env: b.env,
        volumes: b.volumes,
        ...(b.timeout_ms ? { timeoutMs: b.timeout_ms } : {}),
      });
    },
  },
  {
    kind: 'json',
    method: 'POST',
    path: '/v1/gc',
    summary: 'Remove stopped boxes stopped at least older_than seconds ago',
    body: gcBody,
    response: gcResultSchema,
    status: 200,
    handle: ({ act, body }) => act.gcBoxes(parseWith(gcBody, body ?? {}).older_than),
  },
];
