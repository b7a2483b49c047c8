import { z } from 'zod';
import { attachTerminal, type BoxesApp, downloadFile, execEvents, uploadFile } from './boxes-channels.js';
import {
  boxAttachQuery,
  boxExecBody,
  boxListQuery,
  boxListSchema,
  boxSchema,
  createBoxBody,
  downloadBody,
  execListSchema,
  execSchema,
  gcBody,
  gcResultSchema,
  infoSchema,
  removeBoxQuery,
  runBody,
  runResultSchema,
  uploadResultSchema,
} from './boxes-schemas.js';
import { diskRoutes } from './disk-routes.js';
import { type ApiRoute, routesOf } from './http/routes.js';
import { egressBody, egressSchema } from './schemas.js';

const route = routesOf<BoxesApp>();

const binary = { schema: { type: 'string', contentMediaType: 'application/octet-stream' } };

/**
 * The boxes API: each route's input is parsed by the server, and the handler calls one engine
 * method; the streaming ones (events, files, attach) only move bytes (boxes-server.ts).
 */
export const boxRoutes: ApiRoute<BoxesApp>[] = [
  route.json({
    method: 'POST',
    path: '/v1/boxes',
    summary: 'Create a box (pulls or builds its image, boots it)',
    body: createBoxBody,
    response: boxSchema,
    status: 201,
    handle: ({ act, body }) => {
      const b = body;
      return act.createBox({
        image: b.image,
        ...(b.name !== undefined ? { name: b.name } : {}),
        cpu: b.cpu,
        memoryMb: b.memory_mb,
        diskSizeGb: b.disk_size_gb,
        network: b.network,
        ...(b.egress !== undefined ? { egress: b.egress } : {}),
        ...(b.network_id !== undefined ? { networkId: b.network_id } : {}),
        ...(b.workdir !== undefined ? { workdir: b.workdir } : {}),
        env: b.env,
        volumes: b.volumes,
      });
    },
  }),
  route.json({
    method: 'GET',
    path: '/v1/boxes',
    summary: 'List boxes',
    query: boxListQuery,
    response: boxListSchema,
    status: 200,
    handle: ({ act, query }) => ({ boxes: act.listBoxes(query.status) }),
  }),
  route.json({
    method: 'GET',
    path: '/v1/boxes/{id}/egress',
    summary: "A networked box's egress rules, refusal counters and latest refused destinations",
    response: egressSchema,
    status: 200,
    handle: ({ act, params }) => act.egress(params.id ?? '', 'box'),
  }),
  route.json({
    method: 'PUT',
    path: '/v1/boxes/{id}/egress',
    summary: "Replace a networked box's egress rules (effective at once, open connections included)",
    body: egressBody,
    response: egressSchema,
    status: 200,
    handle: ({ act, params, body }) => act.setEgress(params.id ?? '', body, 'box'),
  }),
  route.json({
    method: 'GET',
    path: '/v1/boxes/{id}',
    summary: 'Get a box by id or name',
    response: boxSchema,
    status: 200,
    handle: ({ act, params }) => act.getBox(params.id ?? ''),
  }),
  route.json({
    method: 'POST',
    path: '/v1/boxes/{id}:stop',
    summary: 'Stop a box (its disk is kept)',
    response: boxSchema,
    status: 200,
    handle: ({ act, params }) => act.stopBox(params.id ?? ''),
  }),
  route.json({
    method: 'POST',
    path: '/v1/boxes/{id}:start',
    summary: 'Start a stopped box again',
    response: boxSchema,
    status: 200,
    handle: ({ act, params }) => act.startBox(params.id ?? ''),
  }),
  route.json({
    method: 'DELETE',
    path: '/v1/boxes/{id}',
    summary: 'Remove a box and its disk',
    query: removeBoxQuery,
    status: 204,
    handle: async ({ act, params, query }) => {
      await act.removeBox(params.id ?? '', query.force);
      return undefined;
    },
  }),
  route.json({
    method: 'POST',
    path: '/v1/boxes/{id}/exec',
    summary: 'Start a command; its output streams from /events',
    body: boxExecBody,
    response: execSchema,
    status: 201,
    handle: ({ act, params, body }) => {
      const b = body;
      return act.startExec(params.id ?? '', {
        cmd: b.cmd,
        ...(b.env ? { env: b.env } : {}),
        ...(b.workdir ? { workdir: b.workdir } : {}),
        ...(b.timeout_ms ? { timeoutMs: b.timeout_ms } : {}),
      });
    },
  }),
  route.json({
    method: 'GET',
    path: '/v1/boxes/{id}/execs',
    summary: 'List the execs of a box',
    response: execListSchema,
    status: 200,
    handle: ({ act, params }) => ({ execs: act.listExecs(params.id ?? '') }),
  }),
  route.json({
    method: 'GET',
    path: '/v1/boxes/{id}/exec/{eid}',
    summary: 'Get an exec',
    response: execSchema,
    status: 200,
    handle: ({ act, params }) => act.getExec(params.id ?? '', params.eid ?? ''),
  }),
  route.sse({
    path: '/v1/boxes/{id}/exec/{eid}/events',
    summary: 'Server-Sent Events: the output of an exec, replayed from the start, then live',
    status: 200,
    doc: {
      responses: {
        '200': {
          description:
            'Every `log` event from seq 1 (replayed), then live ones, then one `exit`; data is ' +
            '{"stream","data","seq"}, with "encoding":"base64" when the bytes are not UTF-8',
          content: { 'text/event-stream': { schema: { type: 'string' } } },
        },
      },
    },
    handle: execEvents,
  }),
  route.json({
    method: 'POST',
    path: '/v1/boxes/{id}/exec/{eid}:cancel',
    summary: 'Cancel a running exec (a finished one is left as it is)',
    response: execSchema,
    status: 200,
    handle: ({ act, params }) => act.cancelExec(params.id ?? '', params.eid ?? ''),
  }),
  route.raw({
    method: 'POST',
    path: '/v1/boxes/{id}/files/upload',
    summary: 'Upload a file into the box (multipart/form-data, streamed)',
    status: 200,
    doc: {
      requestBody: {
        required: true,
        content: {
          'multipart/form-data': {
            schema: {
              type: 'object',
              properties: {
                dest: {
                  type: 'string',
                  description:
                    'Absolute path in the box; a trailing / keeps the file name. Send it before the file ' +
                    'to stream a file of any size (a file sent first is held on the host, at most 64 MiB).',
                },
                file: { type: 'string', contentMediaType: 'application/octet-stream' },
              },
              required: ['dest', 'file'],
            },
          },
        },
      },
      responses: {
        '200': {
          description: 'Written (atomically: a temporary file renamed into place)',
          content: { 'application/json': { schema: z.toJSONSchema(uploadResultSchema) } },
        },
      },
    },
    handle: uploadFile,
  }),
  route.raw({
    method: 'POST',
    path: '/v1/boxes/{id}/files/download',
    summary: 'Download a file from the box (streamed)',
    body: downloadBody,
    status: 200,
    doc: {
      responses: {
        '200': {
          description: 'The file; content-length when the size is known up front',
          content: { 'application/octet-stream': binary },
        },
      },
    },
    handle: downloadFile,
  }),
  route.websocket({
    path: '/v1/boxes/{id}/attach',
    summary: 'WebSocket: a terminal in the box (its environment and workdir)',
    description:
      'Binary frames: raw terminal I/O. Text frames: JSON control; client to server ' +
      '{"type":"resize","cols","rows"}; server to client {"type":"exit","code"} (then close 1000). ' +
      'Closing the socket kills the shell; 1001 with a reason when the box goes away.',
    query: boxAttachQuery,
    handle: attachTerminal,
  }),
  route.json({
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
  }),
  route.json({
    method: 'POST',
    path: '/v1/run',
    summary: 'Ephemeral run: create a box, run one command, return its output, remove the box',
    body: runBody,
    response: runResultSchema,
    status: 200,
    handle: ({ act, body }) => {
      const b = body;
      return act.runOnce({
        image: b.image,
        cmd: b.cmd,
        cpu: b.cpu,
        memoryMb: b.memory_mb,
        diskSizeGb: 8,
        network: b.network,
        ...(b.egress !== undefined ? { egress: b.egress } : {}),
        ...(b.network_id !== undefined ? { networkId: b.network_id } : {}),
        env: b.env,
        volumes: b.volumes,
        ...(b.timeout_ms ? { timeoutMs: b.timeout_ms } : {}),
      });
    },
  }),
  route.json({
    method: 'POST',
    path: '/v1/gc',
    summary: 'Remove stopped boxes stopped at least older_than seconds ago',
    body: gcBody,
    response: gcResultSchema,
    status: 200,
    handle: ({ act, body }) => act.gcBoxes(body.older_than),
  }),
  ...diskRoutes<BoxesApp>('boxes'),
];
