import { z } from 'zod';

/**
 * The OpenAI chat completions request as the gateway validates it. Objects are loose: fields
 * hutch does not translate still reach OpenRouter, which speaks this API natively; what the
 * Anthropic translation cannot honour is refused there, by name (translate-request.ts).
 */
const textPart = z.looseObject({ type: z.literal('text'), text: z.string() });
const imagePart = z.looseObject({
  type: z.literal('image_url'),
  image_url: z.looseObject({ url: z.string().min(1), detail: z.string().optional() }),
});
// Other part types (audio, files) pass through to OpenRouter; a text or image part that is
// malformed must not slip through as one of them.
const otherPart = z.looseObject({
  type: z.string().refine((t) => t !== 'text' && t !== 'image_url', 'a malformed text or image_url part'),
});
export const contentPart = z.union([textPart, imagePart, otherPart]);
const content = z.union([z.string(), z.array(contentPart)]);

const toolCall = z.looseObject({
  id: z.string().min(1),
  type: z.literal('function').optional(),
  function: z.looseObject({ name: z.string().min(1), arguments: z.string() }),
});

export const chatMessage = z.union([
  z.looseObject({ role: z.enum(['system', 'developer']), content, name: z.string().optional() }),
  z.looseObject({ role: z.literal('user'), content, name: z.string().optional() }),
  z.looseObject({
    role: z.literal('assistant'),
    content: content.nullish(),
    tool_calls: z.array(toolCall).optional(),
    name: z.string().optional(),
  }),
  z.looseObject({ role: z.literal('tool'), content, tool_call_id: z.string().min(1) }),
]);

const functionTool = z.looseObject({
  type: z.literal('function'),
  function: z.looseObject({
    name: z.string().min(1).max(128),
    description: z.string().optional(),
    parameters: z.record(z.string(), z.unknown()).optional(),
  }),
});

export const chatCompletionBody = z.looseObject({
  model: z.string().min(1).max(256),
  messages: z.array(chatMessage).min(1),
  stream: z.boolean().optional(),
  stream_options: z.looseObject({ include_usage: z.boolean().optional() }).nullish(),
  max_tokens: z.number().int().min(1).nullish(),
  max_completion_tokens: z.number().int().min(1).nullish(),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().min(0).max(1).nullish(),
  stop: z.union([z.string(), z.array(z.string()).max(16)]).nullish(),
  tools: z.array(functionTool).optional(),
  tool_choice: z
    .union([
      z.enum(['auto', 'required', 'none']),
      z.looseObject({ type: z.literal('function'), function: z.looseObject({ name: z.string().min(1) }) }),
    ])
    .optional(),
  parallel_tool_calls: z.boolean().optional(),
  n: z.number().int().min(1).nullish(),
  user: z.string().optional(),
});

export type ChatCompletionRequest = z.output<typeof chatCompletionBody>;
export type ChatMessage = z.output<typeof chatMessage>;
export type ContentPart = z.output<typeof contentPart>;

export type FinishReason = 'stop' | 'length' | 'tool_calls' | 'content_filter';

export interface ChatToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

export interface ChatUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: {
    index: number;
    message: { role: 'assistant'; content: string | null; tool_calls?: ChatToolCall[]; refusal: null };
    finish_reason: FinishReason;
    logprobs: null;
  }[];
  usage: ChatUsage;
}

export interface ChunkToolCall {
  index: number;
  id?: string;
  type?: 'function';
  function: { name?: string; arguments: string };
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  choices: {
    index: number;
    delta: { role?: 'assistant'; content?: string; tool_calls?: ChunkToolCall[] };
    finish_reason: FinishReason | null;
    logprobs?: null;
  }[];
  usage?: ChatUsage | null;
}

/** GET /v1/models, in OpenAI's list shape. */
export interface ModelList {
  object: 'list';
  data: { id: string; object: 'model'; created: number; owned_by: string }[];
}
