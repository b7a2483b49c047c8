import type {
  AnthropicMessagesResponse,
  AnthropicStopReason,
  AnthropicStreamEvent,
  AnthropicUsage,
} from './anthropic-types.js';
import type {
  ChatCompletion,
  ChatCompletionChunk,
  ChatToolCall,
  ChatUsage,
  ChunkToolCall,
  FinishReason,
} from './openai-types.js';

export function finishReason(r: AnthropicStopReason | null | undefined): FinishReason {
  switch (r) {
    case 'max_tokens':
      return 'length';
    case 'tool_use':
      return 'tool_calls';
    case 'refusal':
      return 'content_filter';
    default:
      // end_turn, stop_sequence, pause_turn (the server paused a long turn: the client may go on)
      return 'stop';
  }
}

/** Cached input tokens are input too: OpenAI's prompt_tokens counts every token read. */
export function chatUsage(u: Partial<AnthropicUsage> | undefined): ChatUsage {
  const prompt =
    (u?.input_tokens ?? 0) + (u?.cache_creation_input_tokens ?? 0) + (u?.cache_read_input_tokens ?? 0);
  const completion = u?.output_tokens ?? 0;
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

export const nowSeconds = (): number => Math.floor(Date.now() / 1000);

/** An Anthropic Message as an OpenAI chat.completion (text joined; thinking is not passed on). */
export function toChatCompletion(msg: AnthropicMessagesResponse, created = nowSeconds()): ChatCompletion {
  let text = '';
  let hasText = false;
  const calls: ChatToolCall[] = [];
  for (const b of msg.content ?? []) {
    if (b.type === 'text') {
      text += b.text;
      hasText = true;
    } else if (b.type === 'tool_use')
      calls.push({
        id: b.id,
        type: 'function',
        function: { name: b.name, arguments: JSON.stringify(b.input ?? {}) },
      });
  }
  return {
    id: `chatcmpl-${msg.id}`,
    object: 'chat.completion',
    created,
    model: msg.model,
    choices: [
      {
        index: 0,
        message: {
          role: 'assistant',
          content: hasText || calls.length === 0 ? text : null,
          ...(calls.length ? { tool_calls: calls } : {}),
          refusal: null,
        },
        finish_reason: finishReason(msg.stop_reason),
        logprobs: null,
      },
    ],
    usage: chatUsage(msg.usage),
  };
}

/** What an Anthropic stream translator hands back for each event. */
export type StreamStep =
  | { chunk: ChatCompletionChunk }
  | { error: { message: string; type: string } }
  | { done: true };

/**
 * Anthropic's stream events as OpenAI chunks, one event at a time: the first chunk carries the
 * role, a tool_use block becomes a tool_calls delta with its own `index` (id and name first, then
 * the argument fragments as they come), message_delta's stop reason goes out on the last chunk,
 * then a usage chunk when the client asked for one. An `error` event ends the stream.
 */
export class AnthropicStreamTranslator {
  private id = 'chatcmpl-unknown';
  private model: string;
  private readonly created = nowSeconds();
  private usage: Partial<AnthropicUsage> = {};
  private stop: AnthropicStopReason | null = null;
  /** Anthropic block index → OpenAI tool call index. */
  private readonly tools = new Map<number, number>();
  finished = false;

  constructor(
    model: string,
    private readonly includeUsage: boolean,
  ) {
    this.model = model;
  }

  /** Token counts so far (the input count comes with message_start, the output with message_delta). */
  get tokens(): ChatUsage {
    return chatUsage(this.usage);
  }

  private chunk(
    delta: ChatCompletionChunk['choices'][0]['delta'],
    finish: FinishReason | null = null,
  ): ChatCompletionChunk {
    return {
      id: this.id,
      object: 'chat.completion.chunk',
      created: this.created,
      model: this.model,
      choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }],
    };
  }

  step(e: AnthropicStreamEvent): StreamStep[] {
    switch (e.type) {
      case 'message_start':
        this.id = `chatcmpl-${e.message.id}`;
        this.model = e.message.model || this.model;
        this.usage = { ...e.message.usage };
        return [{ chunk: this.chunk({ role: 'assistant', content: '' }) }];
      case 'content_block_start': {
        const b = e.content_block;
        if (b.type === 'tool_use') {
          const index = this.tools.size;
          this.tools.set(e.index, index);
          const call: ChunkToolCall = {
            index,
            id: b.id,
            type: 'function',
            function: { name: b.name, arguments: '' },
          };
          return [{ chunk: this.chunk({ tool_calls: [call] }) }];
        }
        if (b.type === 'text' && b.text) return [{ chunk: this.chunk({ content: b.text }) }];
        return [];
      }
      case 'content_block_delta': {
        const d = e.delta;
        if (d.type === 'text_delta') return [{ chunk: this.chunk({ content: d.text }) }];
        if (d.type === 'input_json_delta') {
          const index = this.tools.get(e.index);
          if (index === undefined || d.partial_json === '') return [];
          return [
            { chunk: this.chunk({ tool_calls: [{ index, function: { arguments: d.partial_json } }] }) },
          ];
        }
        return [];
      }
      case 'message_delta':
        this.stop = e.delta?.stop_reason ?? this.stop;
        this.usage = {
          ...this.usage,
          ...Object.fromEntries(Object.entries(e.usage ?? {}).filter(([, v]) => v != null)),
        };
        return [];
      case 'message_stop': {
        this.finished = true;
        const out: StreamStep[] = [{ chunk: this.chunk({}, finishReason(this.stop)) }];
        if (this.includeUsage) out.push({ chunk: { ...this.chunk({}), choices: [], usage: this.tokens } });
        out.push({ done: true });
        return out;
      }
      case 'error':
        this.finished = true;
        return [
          { error: { message: e.error?.message ?? 'upstream error', type: e.error?.type ?? 'api_error' } },
        ];
      default:
        // ping, content_block_stop, and event types added after this was written
        return [];
    }
  }
}
