import { HutchError } from '../errors.js';
import type {
  AnthropicContentBlock,
  AnthropicImageBlock,
  AnthropicMessage,
  AnthropicMessagesRequest,
  AnthropicTextBlock,
  AnthropicToolChoice,
} from './anthropic-types.js';
import type { ChatCompletionRequest, ChatMessage, ContentPart } from './openai-types.js';

/** Anthropic requires max_tokens; OpenAI clients usually leave it out. */
export const defaultMaxTokens = 4096;

const imageTypes = new Set(['image/png', 'image/jpeg', 'image/gif', 'image/webp']);

function invalid(message: string, param: string | null = null): HutchError {
  return new HutchError('INVALID_ARGUMENT', message, { param });
}

/**
 * An OpenAI chat completions request as an Anthropic Messages request (the LiteLLM mapping):
 * system messages become the top-level `system`, tool calls and results become tool_use and
 * tool_result blocks, images become image blocks, and consecutive messages of one role are
 * merged because Anthropic requires roles to alternate. What has no Anthropic equivalent and
 * would change the answer (n > 1, JSON mode, logprobs) is refused rather than silently dropped.
 */
export function toAnthropicRequest(req: ChatCompletionRequest): AnthropicMessagesRequest {
  const extra = req as Record<string, unknown>;
  if (req.n != null && req.n > 1) throw invalid('n > 1 is not supported for claude models', 'n');
  const rf = extra.response_format as { type?: string } | undefined;
  if (rf && rf.type !== 'text')
    throw invalid(
      `response_format ${JSON.stringify(rf.type)} is not supported for claude models`,
      'response_format',
    );
  if (extra.logprobs === true) throw invalid('logprobs are not supported for claude models', 'logprobs');
  const system: string[] = [];
  const messages: AnthropicMessage[] = [];
  const push = (role: 'user' | 'assistant', blocks: AnthropicContentBlock[]): void => {
    const last = messages[messages.length - 1];
    if (last && last.role === role) (last.content as AnthropicContentBlock[]).push(...blocks);
    else messages.push({ role, content: blocks });
  };
  req.messages.forEach((m: ChatMessage, i) => {
    const at = `messages.${i}`;
    switch (m.role) {
      case 'system':
      case 'developer':
        system.push(textOf(m.content, at));
        return;
      case 'user':
        push('user', blocksOf(m.content, at));
        return;
      case 'assistant': {
        const blocks: AnthropicContentBlock[] = m.content == null ? [] : blocksOf(m.content, at);
        for (const [j, c] of (m.tool_calls ?? []).entries())
          blocks.push({
            type: 'tool_use',
            id: c.id,
            name: c.function.name,
            input: parseArguments(c.function.arguments, `${at}.tool_calls.${j}.function.arguments`),
          });
        push('assistant', blocks);
        return;
      }
      case 'tool': {
        const content =
          typeof m.content === 'string' ? m.content : blocksOf(m.content, at).filter(isTextOrImage);
        push('user', [{ type: 'tool_result', tool_use_id: m.tool_call_id, content }]);
        return;
      }
    }
  });
  // A message left with only empty text (an assistant turn that was all tool calls has none)
  // would be refused by Anthropic; a lone string keeps its shape for the common case.
  for (const m of messages) {
    const blocks = m.content as AnthropicContentBlock[];
    const first = blocks[0];
    if (blocks.length === 1 && first?.type === 'text') m.content = first.text;
  }
  if (messages.length === 0) throw invalid('at least one user or assistant message is required', 'messages');
  const out: AnthropicMessagesRequest = {
    model: req.model,
    max_tokens: req.max_completion_tokens ?? req.max_tokens ?? defaultMaxTokens,
    messages,
  };
  if (system.length) out.system = system.join('\n\n');
  if (req.temperature != null) out.temperature = req.temperature;
  if (req.top_p != null) out.top_p = req.top_p;
  if (req.stop != null) out.stop_sequences = typeof req.stop === 'string' ? [req.stop] : req.stop;
  if (req.tools?.length)
    out.tools = req.tools.map((t) => ({
      name: t.function.name,
      ...(t.function.description !== undefined ? { description: t.function.description } : {}),
      input_schema: t.function.parameters ?? { type: 'object', properties: {} },
    }));
  const choice = toolChoice(req);
  if (choice) out.tool_choice = choice;
  if (req.user) out.metadata = { user_id: req.user };
  if (req.stream) out.stream = true;
  return out;
}

function toolChoice(req: ChatCompletionRequest): AnthropicToolChoice | undefined {
  const noParallel = req.parallel_tool_calls === false ? { disable_parallel_tool_use: true } : {};
  const c = req.tool_choice;
  if (c === undefined)
    return req.tools?.length && req.parallel_tool_calls === false
      ? { type: 'auto', ...noParallel }
      : undefined;
  if (c === 'auto') return { type: 'auto', ...noParallel };
  if (c === 'required') return { type: 'any', ...noParallel };
  if (c === 'none') return { type: 'none' };
  return { type: 'tool', name: c.function.name, ...noParallel };
}

function isTextOrImage(b: AnthropicContentBlock): b is AnthropicTextBlock | AnthropicImageBlock {
  return b.type === 'text' || b.type === 'image';
}

/** The text of a system message (its text parts joined: Anthropic's system takes text only). */
function textOf(content: string | ContentPart[], at: string): string {
  if (typeof content === 'string') return content;
  return content
    .map((p, j) => {
      if (p.type !== 'text')
        throw invalid(`${at}.content.${j}: a system message may hold text only`, 'messages');
      return (p as { text: string }).text;
    })
    .join('\n');
}

function blocksOf(content: string | ContentPart[], at: string): AnthropicContentBlock[] {
  if (typeof content === 'string') return content === '' ? [] : [{ type: 'text', text: content }];
  const out: AnthropicContentBlock[] = [];
  content.forEach((p, j) => {
    if (p.type === 'text') {
      const text = (p as { text: string }).text;
      if (text !== '') out.push({ type: 'text', text });
    } else if (p.type === 'image_url')
      out.push(imageBlock((p as { image_url: { url: string } }).image_url.url, `${at}.content.${j}`));
    else
      throw invalid(
        `${at}.content.${j}: content parts of type ${JSON.stringify(p.type)} are not supported for claude models (text and image_url are)`,
        'messages',
      );
  });
  return out;
}

/** A data URL becomes a base64 block; an http(s) URL a url block Anthropic fetches itself. */
export function imageBlock(url: string, at: string): AnthropicImageBlock {
  if (/^https?:\/\//i.test(url)) return { type: 'image', source: { type: 'url', url } };
  const m = /^data:([^;,]+);base64,(.*)$/s.exec(url);
  if (!m) throw invalid(`${at}: image_url must be a data: URL (base64) or an http(s) URL`, 'messages');
  const mediaType = (m[1] ?? '').toLowerCase();
  if (!imageTypes.has(mediaType))
    throw invalid(
      `${at}: image type ${JSON.stringify(mediaType)} is not supported (png, jpeg, gif, webp are)`,
      'messages',
    );
  return {
    type: 'image',
    source: { type: 'base64', media_type: mediaType as 'image/png', data: (m[2] ?? '').replace(/\s+/g, '') },
  };
}

/** A tool call's arguments: a JSON object as a string ("" is no arguments). */
function parseArguments(text: string, at: string): Record<string, unknown> {
  if (text.trim() === '') return {};
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw invalid(`${at} is not valid JSON: ${(e as Error).message}`, 'messages');
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v))
    throw invalid(`${at} must be a JSON object`, 'messages');
  return v as Record<string, unknown>;
}
