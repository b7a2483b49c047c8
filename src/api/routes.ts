import { z } from 'zod';
import { accountRoutes } from './account-routes.js';
import { computerAgent, computerAgentQuery, shellAgent, shellAgentQuery } from './agent-channels.js';
import { vnc } from './desktop-channels.js';
import { desktopRoutes } from './desktop-routes.js';
import { diskRoutes } from './disk-routes.js';
import { gatewayRoutes } from './gateway-routes.js';
import { type ApiRoute, routesOf } from './http/routes.js';
import { attach, download, execStream, type MachinesApp, tty, upload } from './machine-channels.js';
import { previewRoutes } from './preview-routes.js';
import {
  attachQuery,
  autoSuspendBody,
  branchBody,
  branchResultSchema,
  createMachineBody,
  downloadQuery,
  egressBody,
  egressSchema,
  execBody,
  execResultSchema,
  healthSchema,
  lifecycleResultSchema,
  machineListSchema,
  machineSchema,
  uploadResultSchema,
} from './schemas.js';
import { volumeRoutes } from './volume-routes.js';

const route = routesOf<MachinesApp>();

const binary = { schema: { type: 'string', contentMediaType: 'application/octet-stream' } };

/**
 * The machines API: each route's input is parsed by the server, and the handler calls one engine
 * method. No logic lives here (Firecracker's split): behaviour is the engine's, so every API
 * surface gets the same. Streaming routes and channels only move bytes (machine-channels.ts).
 */
export const machineRoutes: ApiRoute<MachinesApp>[] = [
  route.json({
    method: 'GET',
    path: '/healthz',
    summary: 'Liveness, running count, accelerator and template readiness',
    response: healthSchema,
    status: 200,
    // Public: a load balancer's probe has no token, and nothing here is any user's.
    public: true,
    handle: ({ engine }) => engine.health(),
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines',
    summary: 'Boot a machine',
    body: createMachineBody,
    response: machineSchema,
    status: 201,
    handle: ({ act, body }) => {
      const b = body;
      return act.create({
        template: b.template,
        ...(b.ttl_seconds !== undefined ? { ttlSeconds: b.ttl_seconds } : {}),
        ...(b.persistent !== undefined ? { persistent: b.persistent } : {}),
        ...(b.name !== undefined ? { name: b.name } : {}),
        ...(b.net !== undefined ? { net: b.net } : {}),
        ...(b.egress !== undefined ? { egress: b.egress } : {}),
        ...(b.network_id !== undefined ? { networkId: b.network_id } : {}),
        ...(b.mode !== undefined ? { mode: b.mode } : {}),
        ...(b.screen !== undefined ? { screen: b.screen } : {}),
        ...(b.auto_suspend_seconds !== undefined ? { autoSuspendSeconds: b.auto_suspend_seconds } : {}),
        ...(b.volume !== undefined ? { volume: b.volume } : {}),
      });
    },
  }),
  route.json({
    method: 'GET',
    path: '/v1/machines/{id}/egress',
    summary: "A networked machine's egress rules, refusal counters and latest refused destinations",
    response: egressSchema,
    status: 200,
    handle: ({ act, params }) => act.egress(params.id ?? ''),
  }),
  route.json({
    method: 'PUT',
    path: '/v1/machines/{id}/egress',
    summary: "Replace a networked machine's egress rules (effective at once, open connections included)",
    body: egressBody,
    response: egressSchema,
    status: 200,
    handle: ({ act, params, body }) => act.setEgress(params.id ?? '', body),
  }),
  route.json({
    method: 'GET',
    path: '/v1/machines',
    summary: 'List machines',
    response: machineListSchema,
    status: 200,
    handle: ({ act }) => ({ machines: act.list() }),
  }),
  route.json({
    method: 'GET',
    path: '/v1/machines/{id}',
    summary: 'Fetch one machine (by id or name)',
    response: machineSchema,
    status: 200,
    handle: ({ act, params }) => act.get(params.id ?? ''),
  }),
  route.json({
    method: 'DELETE',
    path: '/v1/machines/{id}',
    summary: 'Destroy a machine now',
    status: 204,
    handle: async ({ act, params }) => {
      await act.destroy(params.id ?? '');
      return undefined;
    },
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines/{id}/exec',
    summary: 'Run a command and wait for its result',
    body: execBody,
    response: execResultSchema,
    status: 200,
    handle: ({ act, params, body, signal }) => {
      const b = body;
      return act.exec(params.id ?? '', {
        argv: typeof b.cmd === 'string' ? ['/bin/sh', '-c', b.cmd] : b.cmd,
        ...(b.env ? { env: b.env } : {}),
        ...(b.cwd ? { cwd: b.cwd } : {}),
        ...(b.stdin !== undefined ? { stdin: b.stdin } : {}),
        timeoutMs: b.timeout_ms ?? 60_000,
        // A client that gives up on the answer takes the command with it.
        signal,
      });
    },
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines/{id}/branch',
    summary: 'Fork a running machine into a live clone',
    body: branchBody,
    response: branchResultSchema,
    status: 201,
    handle: ({ act, params, body }) => {
      const b = body;
      return act.branch(params.id ?? '', {
        ...(b.name !== undefined ? { name: b.name } : {}),
        ...(b.ttl_seconds !== undefined ? { ttlSeconds: b.ttl_seconds } : {}),
      });
    },
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines/{id}/pause',
    summary: 'Pause: stop the vCPUs, keep everything in memory',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ act, params }) => act.pause(params.id ?? ''),
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines/{id}/resume',
    summary: 'Resume a paused or suspended machine',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ act, params }) => act.resume(params.id ?? ''),
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines/{id}/suspend',
    summary: 'Suspend: write the machine to disk and free its memory',
    response: lifecycleResultSchema,
    status: 200,
    handle: ({ act, params }) => act.suspend(params.id ?? ''),
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines/{id}/auto-suspend',
    summary: 'Set the idle auto-suspend timeout (0 disables)',
    body: autoSuspendBody,
    response: machineSchema,
    status: 200,
    handle: ({ act, params, body }) => act.setAutoSuspend(params.id ?? '', body.seconds),
  }),
  // Streaming: live exec output and file transfer.
  route.ndjson({
    method: 'POST',
    path: '/v1/machines/{id}/exec/stream',
    summary: 'Run a command and stream its output as it arrives (NDJSON)',
    body: execBody,
    status: 200,
    doc: {
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
  }),
  route.raw({
    method: 'POST',
    path: '/v1/machines/{id}/upload',
    summary: 'Upload a file to /root/<X-Filename> (the request body, streamed)',
    status: 200,
    doc: {
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
  }),
  route.raw({
    method: 'GET',
    path: '/v1/machines/{id}/download',
    summary: 'Download a file from the machine (streamed)',
    query: downloadQuery,
    status: 200,
    doc: {
      responses: {
        '200': {
          description: 'The file; content-length when the size is known up front',
          content: { 'application/octet-stream': binary },
        },
      },
    },
    handle: download,
  }),
  // WebSocket channels.
  route.websocket({
    path: '/v1/machines/{id}/tty',
    summary: 'WebSocket: the serial console (bytes to and from the guest /dev/ttyS0)',
    description:
      'Binary frames both ways (text frames from the client are typed as their UTF-8 bytes). A new ' +
      'viewer first gets the recent output, then live output; any number of viewers. Closes with ' +
      '1001 and a reason when the machine goes away.',
    handle: tty,
  }),
  route.websocket({
    path: '/v1/machines/{id}/attach',
    summary: 'WebSocket: an interactive shell on a PTY',
    description:
      'Binary frames: raw terminal I/O. Text frames: JSON control; client to server ' +
      '{"type":"resize","cols","rows"}; server to client {"type":"exit","code"} (then close 1000). ' +
      'Closing the socket kills the shell; 1001 with a reason when the machine goes away.',
    query: attachQuery,
    handle: attach,
  }),
  route.websocket({
    path: '/v1/machines/{id}/agent',
    summary: "WebSocket: a computer-use agent works on the machine's screen toward `goal`",
    description:
      'Server to client: JSON text frames, one event each, as they happen (docs/agents.md): ' +
      '{"type":"start","goal","model","tool_version"}, {"type":"text","text"}, ' +
      '{"type":"action","step","name","input"}, {"type":"screenshot","step","width","height","data"?}, ' +
      '{"type":"result","step","ok","output"?}, {"type":"error","code","message"}, then ' +
      '{"type":"done","outcome","steps","usage"} and close 1000. Client to server: {"type":"stop"} ' +
      '(the current action finishes, then done with outcome "stopped"); closing the socket abandons ' +
      'the run. One agent per machine at a time (409 AGENT_BUSY); a machine without a display is 409 NO_DISPLAY.',
    query: computerAgentQuery,
    handle: computerAgent,
  }),
  route.websocket({
    path: '/v1/machines/{id}/shell-agent',
    summary: 'WebSocket: an agent works in the machine with bash and a text editor toward `goal`',
    description:
      'Events as on /agent, with {"type":"result","step","ok","output"} after each tool use; the ' +
      'done event carries "preview_urls" when the run left new servers listening. One agent per ' +
      'machine at a time (409 AGENT_BUSY).',
    query: shellAgentQuery,
    handle: shellAgent,
  }),
  route.websocket({
    path: '/v1/machines/{id}/vnc',
    summary: "WebSocket: the machine's screen, keyboard and mouse over VNC (RFB, as noVNC speaks it)",
    description:
      "Binary frames both ways carrying RFB 3.8 (security None: hutch's authentication is the " +
      'credential; browsers, which cannot set headers on a WebSocket, pass ?token=<JWT>). Text frames ' +
      'are refused (close 1003). Any number of viewers, all shared: a client asking for exclusive ' +
      'access is refused by the VNC server, the others stay. 409 NO_DISPLAY when the machine has no ' +
      'display. Closes with 1000 when the VNC server ends the connection, 1001 with a reason when the ' +
      'machine goes away.',
    handle: vnc,
  }),
  ...accountRoutes,
  ...previewRoutes,
  ...diskRoutes<MachinesApp>('machines'),
  ...desktopRoutes<MachinesApp>(),
  ...volumeRoutes,
  ...gatewayRoutes,
];
