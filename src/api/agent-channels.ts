import type { TLSSocket } from 'node:tls';
import type { RawData, WebSocket } from 'ws';
import { z } from 'zod';
import type { AgentHandle, StartAgentRequest } from '../agents/agent-actions.js';
import { goalProblem } from '../agents/agent-actions.js';
import type { AgentKind } from '../agents/agent-loop.js';
import { computerToolVersions } from '../agents/computer-tool.js';
import { shellToolVersion } from '../agents/shell-tools.js';
import type { RequestParts } from './http/routes.js';
import { closeCodes } from './http/websocket.js';
import type { MachinesApp } from './machine-channels.js';

/**
 * The agents' WebSocket channels (docs/agents.md): parse the query, start the run through the
 * caller's actions (errors before the upgrade are ordinary HTTP errors), then only pump: events
 * out as JSON text frames, `{"type":"stop"}` in. Closing the socket cancels the run.
 */

const goal = z
  .string()
  .min(1)
  .superRefine((g, ctx) => {
    const problem = goalProblem(g);
    if (problem) ctx.addIssue({ code: 'custom', message: problem });
  })
  .describe(
    'What the agent is to do, in plain words (at most 4 KiB; no control characters but tab and line breaks).',
  );
const common = {
  goal,
  max_steps: z.coerce
    .number()
    .int()
    .min(1)
    .max(1000)
    .optional()
    .describe('Most model turns (default 50; the server caps it, HUTCH_AGENT_MAX_STEPS).'),
  model: z.string().min(1).max(200).optional().describe('The model (default HUTCH_AGENT_MODEL).'),
};

export const computerAgentQuery = z.object({
  ...common,
  tool_version: z
    .enum(Object.keys(computerToolVersions) as [string, ...string[]])
    .optional()
    .describe('The computer-use tool version (default HUTCH_AGENT_TOOL_VERSION).'),
  screenshots: z
    .enum(['inline', 'none'])
    .optional()
    .describe('inline: screenshot events carry the PNG as base64 `data`.'),
});

export const shellAgentQuery = z.object({
  ...common,
  tool_version: z.enum([shellToolVersion]).optional().describe('The bash tool version (only bash_20250124).'),
});

/** Past this many bytes waiting for a client that does not read, it is let go. */
const maxBuffered = 32 * 1024 * 1024;

const noop = (): void => {};

type Ctx<Q> = MachinesApp & RequestParts<Q, undefined> & { accept: () => Promise<WebSocket> };

/** Where a client that reached the API with this request opens a machine's port. */
function previewUrlOf(ctx: MachinesApp & { req: RequestParts<unknown, unknown>['req'] }) {
  return (id: string, port: number): string => {
    if (ctx.previews) return ctx.previews.urlOf(ctx.req, id, port);
    const proto = (ctx.req.socket as TLSSocket).encrypted ? 'https' : 'http';
    return `${proto}://${ctx.req.headers.host ?? 'localhost'}/v1/machines/${id}/web/${port}/`;
  };
}

async function serve<Q extends { goal: string; max_steps?: number | undefined; model?: string | undefined }>(
  ctx: Ctx<Q>,
  kind: AgentKind,
  extra: Partial<StartAgentRequest>,
): Promise<void> {
  const q = ctx.query;
  const h: AgentHandle = await ctx.act.startAgent(ctx.params.id ?? '', {
    kind,
    goal: q.goal,
    maxSteps: q.max_steps,
    model: q.model,
    previewUrl: previewUrlOf(ctx),
    ...extra,
  });
  let ws: WebSocket;
  try {
    ws = await ctx.accept();
  } catch (e) {
    h.cancel();
    throw e;
  }
  ws.on('error', noop);
  ws.on('close', () => h.cancel());
  ws.on('message', (data: RawData, isBinary: boolean) => {
    if (isBinary) return;
    try {
      const m = JSON.parse(data.toString()) as { type?: unknown };
      if (m?.type === 'stop') h.stop();
    } catch {
      // Not JSON: ignored, like any message the channel does not know.
    }
  });
  for await (const ev of h.events) {
    if (ws.readyState !== ws.OPEN) continue;
    if (ws.bufferedAmount > maxBuffered) {
      ws.close(closeCodes.tryAgainLater, 'agent client fell behind');
      h.cancel();
      continue;
    }
    ws.send(JSON.stringify(ev));
  }
  if (ws.readyState === ws.OPEN) ws.close(closeCodes.normal, 'done');
}

export function computerAgent(ctx: Ctx<z.output<typeof computerAgentQuery>>): Promise<void> {
  return serve(ctx, 'computer', {
    toolVersion: ctx.query.tool_version,
    inlineScreenshots: ctx.query.screenshots === 'inline',
  });
}

export function shellAgent(ctx: Ctx<z.output<typeof shellAgentQuery>>): Promise<void> {
  return serve(ctx, 'shell', { toolVersion: ctx.query.tool_version });
}
