import type { ServerResponse } from 'node:http';
import { z } from 'zod';
import { HutchError } from '../errors.js';
import { gatewayErrorShape } from '../gateway/gateway-errors.js';
import { chatCompletionBody } from '../gateway/openai-types.js';
import { writeRespectingBackpressure } from './exec-stream.js';
import { type ApiRoute, routesOf } from './http/routes.js';
import type { MachinesApp } from './machine-channels.js';

const route = routesOf<MachinesApp>();

/** Chat requests carry images as base64: far more than the 1 MiB other JSON bodies may be. */
export const maxChatBodyBytes = 20 * 1024 * 1024;

const modelSchema = z.object({
  id: z.string(),
  object: z.literal('model'),
  created: z.number(),
  owned_by: z.string(),
});
const modelListSchema = z.object({ object: z.literal('list'), data: z.array(modelSchema) });

const usageQuery = z.object({
  since: z.string().optional().describe('Only requests from this time on: Unix seconds or an ISO 8601 time'),
});

const usageSchema = z.object({
  object: z.literal('usage'),
  user: z.string(),
  since: z.number().describe('ms since the epoch'),
  data: z.array(
    z.object({
      model: z.string(),
      requests: z.number(),
      prompt_tokens: z.number(),
      completion_tokens: z.number(),
      total_tokens: z.number(),
    }),
  ),
});

function sinceMs(v: string | undefined): number | undefined {
  if (v === undefined || v === '') return undefined;
  const ms = /^\d+(\.\d+)?$/.test(v) ? Number(v) * 1000 : Date.parse(v);
  if (!Number.isFinite(ms))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `since: ${JSON.stringify(v.slice(0, 100))} is neither Unix seconds nor an ISO 8601 time`,
    );
  return ms;
}

/** Writes a stream's `data:` payloads as Server-Sent Events; stops when the client goes away. */
async function writeSse(
  res: ServerResponse,
  events: AsyncGenerator<string>,
  signal: AbortSignal,
): Promise<void> {
  res.writeHead(200, {
    'content-type': 'text/event-stream',
    'cache-control': 'no-cache',
    'x-accel-buffering': 'no',
  });
  res.flushHeaders();
  try {
    for await (const data of events) {
      if (signal.aborted) break;
      await writeRespectingBackpressure(res, `data: ${data}\n\n`);
    }
  } catch {
    // The client went away: nothing to say to it (the upstream request is cut by `return` below).
  } finally {
    await events.return(undefined);
    res.end();
  }
}

/**
 * The model gateway (docs/gateway.md) on the machines API: OpenAI's chat completions and model
 * list, so the official SDKs work with only their base URL changed, and each caller's usage.
 * Every error answers in hutch's shape and OpenAI's at once (gateway-errors.ts).
 */
export const gatewayRoutes: ApiRoute<MachinesApp>[] = [
  route.raw({
    method: 'POST',
    path: '/v1/chat/completions',
    summary: 'OpenAI chat completion: claude* models via Anthropic (translated), others via OpenRouter',
    status: 200,
    errorShape: gatewayErrorShape,
    body: chatCompletionBody,
    maxBodyBytes: maxChatBodyBytes,
    doc: {
      responses: {
        '200': {
          description:
            'A chat.completion object, or with "stream": true Server-Sent Events: chat.completion.chunk ' +
            'objects as `data:` lines, a usage chunk when stream_options.include_usage, then `data: [DONE]`; ' +
            'a failure after the stream began is one `data:` error object ({"code","message","error"}), then the end.',
          content: {
            'application/json': { schema: { type: 'object' } },
            'text/event-stream': { schema: { type: 'string' } },
          },
        },
      },
    },
    handle: async ({ act, body, res, signal }) => {
      const result = await act.chatCompletions(body, { signal });
      if (!result.stream) return result.body;
      await writeSse(res, result.events, signal);
      return undefined;
    },
  }),
  route.json({
    method: 'GET',
    path: '/v1/models',
    summary: 'The models the gateway can serve (those of providers with a key), in OpenAI list shape',
    response: modelListSchema,
    status: 200,
    errorShape: gatewayErrorShape,
    handle: ({ act }) => act.listModels(),
  }),
  route.json({
    method: 'GET',
    // OpenRouter's ids have a slash and may have a colon (`vendor/model:free`).
    path: '/v1/models/{id+}',
    summary: 'One model the gateway can serve, in OpenAI shape; 404 MODEL_NOT_FOUND when it is not served',
    response: modelSchema,
    status: 200,
    errorShape: gatewayErrorShape,
    handle: ({ act, params }) => act.getModel(params.id ?? ''),
  }),
  route.json({
    method: 'GET',
    path: '/v1/usage',
    summary: "The caller's gateway token usage, totals per model",
    query: usageQuery,
    response: usageSchema,
    status: 200,
    errorShape: gatewayErrorShape,
    handle: ({ act, query }) => {
      const since = sinceMs(query.since);
      return act.usage(since !== undefined ? { since } : {});
    },
  }),
];
