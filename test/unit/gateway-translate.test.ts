import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { AnthropicMessagesResponse, AnthropicStreamEvent } from '../../src/gateway/anthropic-types.js';
import { gatewayErrorShape } from '../../src/gateway/gateway-errors.js';
import { chatCompletionBody } from '../../src/gateway/openai-types.js';
import { toAnthropicRequest } from '../../src/gateway/translate-request.js';
import { AnthropicStreamTranslator, toChatCompletion } from '../../src/gateway/translate-response.js';
import { retryAfterSeconds, UpstreamCall, upstreamError } from '../../src/gateway/upstream.js';
import { anthropicEvents } from '../helpers/mock-llm.js';

const png =
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';

/** What the openai SDK sends for a tools round trip with an image (recorded shape). */
const openaiRequest = {
  model: 'claude-sonnet-4-5',
  messages: [
    { role: 'system', content: 'You are terse.' },
    { role: 'developer', content: [{ type: 'text', text: 'Use tools.' }] },
    {
      role: 'user',
      content: [
        { type: 'text', text: 'What is in this picture, and the weather in Paris?' },
        { type: 'image_url', image_url: { url: `data:image/png;base64,${png}` } },
        { type: 'image_url', image_url: { url: 'https://example.com/cat.jpg', detail: 'low' } },
      ],
    },
    {
      role: 'assistant',
      content: null,
      tool_calls: [
        { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } },
        { id: 'call_2', type: 'function', function: { name: 'get_time', arguments: '' } },
      ],
    },
    { role: 'tool', tool_call_id: 'call_1', content: '18 C, cloudy' },
    { role: 'tool', tool_call_id: 'call_2', content: [{ type: 'text', text: '14:02' }] },
    { role: 'user', content: 'Thanks.' },
  ],
  tools: [
    {
      type: 'function',
      function: {
        name: 'get_weather',
        description: 'Weather for a city',
        parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
      },
    },
    { type: 'function', function: { name: 'get_time' } },
  ],
  tool_choice: 'required',
  temperature: 0.2,
  top_p: 0.9,
  stop: 'END',
  max_completion_tokens: 500,
  user: 'u-42',
};

describe('gateway: OpenAI → Anthropic request', () => {
  test('system, images, tool calls and results, merging, tools and choices', () => {
    const out = toAnthropicRequest(chatCompletionBody.parse(openaiRequest));
    assert.deepEqual(out, {
      model: 'claude-sonnet-4-5',
      max_tokens: 500,
      system: 'You are terse.\n\nUse tools.',
      messages: [
        {
          role: 'user',
          content: [
            { type: 'text', text: 'What is in this picture, and the weather in Paris?' },
            { type: 'image', source: { type: 'base64', media_type: 'image/png', data: png } },
            { type: 'image', source: { type: 'url', url: 'https://example.com/cat.jpg' } },
          ],
        },
        {
          role: 'assistant',
          content: [
            { type: 'tool_use', id: 'call_1', name: 'get_weather', input: { city: 'Paris' } },
            { type: 'tool_use', id: 'call_2', name: 'get_time', input: {} },
          ],
        },
        {
          // Both tool results and the next user turn: one user message (roles must alternate).
          role: 'user',
          content: [
            { type: 'tool_result', tool_use_id: 'call_1', content: '18 C, cloudy' },
            { type: 'tool_result', tool_use_id: 'call_2', content: [{ type: 'text', text: '14:02' }] },
            { type: 'text', text: 'Thanks.' },
          ],
        },
      ],
      temperature: 0.2,
      top_p: 0.9,
      stop_sequences: ['END'],
      tools: [
        {
          name: 'get_weather',
          description: 'Weather for a city',
          input_schema: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
        },
        { name: 'get_time', input_schema: { type: 'object', properties: {} } },
      ],
      tool_choice: { type: 'any' },
      metadata: { user_id: 'u-42' },
    });
  });

  test('defaults and tool_choice variants', () => {
    const base = { model: 'claude-x', messages: [{ role: 'user', content: 'hi' }] };
    const plain = toAnthropicRequest(chatCompletionBody.parse({ ...base, max_tokens: 77, stream: true }));
    assert.deepEqual(plain, {
      model: 'claude-x',
      max_tokens: 77,
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
    });
    assert.equal(toAnthropicRequest(chatCompletionBody.parse(base)).max_tokens, 4096);
    const tools = [{ type: 'function', function: { name: 'f' } }];
    const choice = (tool_choice: unknown, extra: object = {}): unknown =>
      toAnthropicRequest(chatCompletionBody.parse({ ...base, tools, tool_choice, ...extra })).tool_choice;
    assert.deepEqual(choice('auto'), { type: 'auto' });
    assert.deepEqual(choice('none'), { type: 'none' });
    assert.deepEqual(choice({ type: 'function', function: { name: 'f' } }), { type: 'tool', name: 'f' });
    assert.deepEqual(choice('auto', { parallel_tool_calls: false }), {
      type: 'auto',
      disable_parallel_tool_use: true,
    });
    assert.deepEqual(
      toAnthropicRequest(chatCompletionBody.parse({ ...base, stop: ['a', 'b'] })).stop_sequences,
      ['a', 'b'],
    );
  });

  test('refusals: bad tool arguments, unsupported parts and options', () => {
    const bad = (body: object, re: RegExp): void =>
      assert.throws(
        () => toAnthropicRequest(chatCompletionBody.parse(body)),
        (e: { code?: string; message?: string }) => e.code === 'INVALID_ARGUMENT' && re.test(e.message ?? ''),
      );
    const user = { role: 'user', content: 'hi' };
    bad(
      {
        model: 'claude-x',
        messages: [
          user,
          {
            role: 'assistant',
            tool_calls: [{ id: 'c', type: 'function', function: { name: 'f', arguments: '{oops' } }],
          },
        ],
      },
      /messages\.1\.tool_calls\.0\.function\.arguments is not valid JSON/,
    );
    bad(
      {
        model: 'claude-x',
        messages: [
          user,
          { role: 'assistant', tool_calls: [{ id: 'c', function: { name: 'f', arguments: '[1]' } }] },
        ],
      },
      /must be a JSON object/,
    );
    bad(
      {
        model: 'claude-x',
        messages: [{ role: 'user', content: [{ type: 'input_audio', input_audio: {} }] }],
      },
      /input_audio/,
    );
    bad(
      {
        model: 'claude-x',
        messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'ftp://x/y.png' } }] }],
      },
      /data: URL/,
    );
    bad(
      {
        model: 'claude-x',
        messages: [
          {
            role: 'user',
            content: [{ type: 'image_url', image_url: { url: 'data:image/tiff;base64,AAAA' } }],
          },
        ],
      },
      /image\/tiff/,
    );
    bad({ model: 'claude-x', messages: [user], n: 2 }, /n > 1/);
    bad({ model: 'claude-x', messages: [user], response_format: { type: 'json_object' } }, /response_format/);
    bad(
      { model: 'claude-x', messages: [{ role: 'system', content: 'only a system prompt' }] },
      /at least one/,
    );
  });
});

const toolMessage: AnthropicMessagesResponse = {
  id: 'msg_01Aq9w938a90dw8q',
  type: 'message',
  role: 'assistant',
  model: 'claude-sonnet-4-5-20250929',
  content: [
    { type: 'text', text: 'Checking the weather.' },
    { type: 'tool_use', id: 'toolu_01A', name: 'get_weather', input: { city: 'Paris', unit: 'c' } },
  ],
  stop_reason: 'tool_use',
  stop_sequence: null,
  usage: {
    input_tokens: 100,
    output_tokens: 30,
    cache_read_input_tokens: 20,
    cache_creation_input_tokens: 0,
  },
};

describe('gateway: Anthropic → OpenAI response', () => {
  test('text and tool_use become content and tool_calls; usage and stop reason mapped', () => {
    const out = toChatCompletion(toolMessage, 1733000000);
    assert.deepEqual(out, {
      id: 'chatcmpl-msg_01Aq9w938a90dw8q',
      object: 'chat.completion',
      created: 1733000000,
      model: 'claude-sonnet-4-5-20250929',
      choices: [
        {
          index: 0,
          message: {
            role: 'assistant',
            content: 'Checking the weather.',
            tool_calls: [
              {
                id: 'toolu_01A',
                type: 'function',
                function: { name: 'get_weather', arguments: '{"city":"Paris","unit":"c"}' },
              },
            ],
            refusal: null,
          },
          finish_reason: 'tool_calls',
          logprobs: null,
        },
      ],
      usage: { prompt_tokens: 120, completion_tokens: 30, total_tokens: 150 },
    });
  });

  test('stop reasons', () => {
    const reason = (stop_reason: AnthropicMessagesResponse['stop_reason']): string =>
      toChatCompletion({ ...toolMessage, content: [{ type: 'text', text: 'x' }], stop_reason }).choices[0]
        ?.finish_reason ?? '';
    assert.equal(reason('end_turn'), 'stop');
    assert.equal(reason('stop_sequence'), 'stop');
    assert.equal(reason('max_tokens'), 'length');
    assert.equal(reason('tool_use'), 'tool_calls');
    assert.equal(reason('refusal'), 'content_filter');
    const onlyTool = toChatCompletion({ ...toolMessage, content: [toolMessage.content[1] as never] });
    assert.equal(onlyTool.choices[0]?.message.content, null);
  });

  test('a stream: role first, text pieces, tool call id+name then argument fragments, finish, usage, [DONE]', () => {
    const events = anthropicEvents(toolMessage as never).map((e) => e.data as AnthropicStreamEvent);
    const t = new AnthropicStreamTranslator('claude-sonnet-4-5', true);
    const steps = events.flatMap((e) => t.step(e));
    const chunks = steps
      .filter((s) => 'chunk' in s)
      .map((s) => (s as { chunk: { choices: unknown[]; usage?: unknown } }).chunk);
    assert.ok(steps.at(-1) && 'done' in (steps.at(-1) as object));
    type C = {
      choices: { delta: Record<string, unknown>; finish_reason: string | null }[];
      usage?: unknown;
      id: string;
    };
    const cs = chunks as C[];
    assert.ok(cs.every((c) => c.id === 'chatcmpl-msg_01Aq9w938a90dw8q'));
    assert.deepEqual(cs[0]?.choices[0]?.delta, { role: 'assistant', content: '' });
    const text = cs.map((c) => c.choices[0]?.delta.content ?? '').join('');
    assert.equal(text, 'Checking the weather.');
    assert.ok(cs.filter((c) => c.choices[0]?.delta.content).length >= 3, 'text arrives in pieces');
    const calls = cs.flatMap(
      (c) =>
        (c.choices[0]?.delta.tool_calls as {
          index: number;
          id?: string;
          function: { name?: string; arguments: string };
        }[]) ?? [],
    );
    assert.deepEqual(calls[0], {
      index: 0,
      id: 'toolu_01A',
      type: 'function',
      function: { name: 'get_weather', arguments: '' },
    });
    assert.ok(calls.length > 2, 'arguments in fragments');
    assert.ok(calls.slice(1).every((c) => c.id === undefined && c.index === 0));
    assert.deepEqual(JSON.parse(calls.map((c) => c.function.arguments).join('')), {
      city: 'Paris',
      unit: 'c',
    });
    const last = cs.at(-2);
    assert.equal(last?.choices[0]?.finish_reason, 'tool_calls');
    assert.deepEqual(cs.at(-1)?.choices, []);
    assert.deepEqual(cs.at(-1)?.usage, { prompt_tokens: 120, completion_tokens: 30, total_tokens: 150 });
  });

  test('a stream without include_usage has no usage chunk; an error event ends it', () => {
    const t = new AnthropicStreamTranslator('claude-x', false);
    const steps = anthropicEvents({
      ...toolMessage,
      content: [{ type: 'text', text: 'hi' }],
      stop_reason: 'end_turn',
    } as never)
      .map((e) => e.data as AnthropicStreamEvent)
      .flatMap((e) => t.step(e));
    assert.equal(steps.filter((s) => 'chunk' in s && s.chunk.choices.length === 0).length, 0);
    const e = new AnthropicStreamTranslator('claude-x', false).step({
      type: 'error',
      error: { type: 'overloaded_error', message: 'Overloaded' },
    });
    assert.deepEqual(e, [{ error: { type: 'overloaded_error', message: 'Overloaded' } }]);
  });
});

describe('gateway: upstream errors', () => {
  test('Retry-After as seconds or as an HTTP date; nonsense is dropped, a far date capped', () => {
    const now = Date.parse('2026-12-04T01:00:00Z');
    assert.equal(retryAfterSeconds('7', now), 7);
    assert.equal(retryAfterSeconds(' 1.5 ', now), 1.5);
    assert.equal(retryAfterSeconds('Fri, 04 Dec 2026 01:00:30 GMT', now), 30);
    assert.equal(retryAfterSeconds('Fri, 04 Dec 2026 00:59:00 GMT', now), 0, 'a date gone by');
    assert.equal(retryAfterSeconds('Wed, 01 Jan 2070 00:00:00 GMT', now), 86_400);
    for (const v of [null, '', 'soon', '-3', '1e9', '12abc'])
      assert.equal(retryAfterSeconds(v, now), undefined, String(v));
    const dated = upstreamError('openrouter', 429, '{}', new Date(Date.now() + 20_000).toUTCString());
    const header = Number(gatewayErrorShape(dated).headers?.['retry-after']);
    assert.ok(header >= 19 && header <= 20, String(header));
  });

  test('status mapping, provider message kept, key never named, Retry-After passed', () => {
    const anth = (type: string, message: string): string =>
      JSON.stringify({ type: 'error', error: { type, message } });
    const r = upstreamError('anthropic', 429, anth('rate_limit_error', 'slow down'), '7');
    assert.equal(r.code, 'UPSTREAM_RATE_LIMITED');
    assert.match(r.message, /slow down/);
    assert.deepEqual(gatewayErrorShape(r).headers, { 'retry-after': '7' });
    assert.equal((gatewayErrorShape(r).body.error as { type: string }).type, 'rate_limit_error');
    const bad = upstreamError('anthropic', 400, anth('invalid_request_error', 'max_tokens: too big'), null);
    assert.equal(bad.code, 'INVALID_ARGUMENT');
    assert.match(bad.message, /max_tokens: too big/);
    const key = upstreamError(
      'openrouter',
      401,
      JSON.stringify({ error: { message: 'key sk-or-secret invalid' } }),
      null,
    );
    assert.equal(key.code, 'UPSTREAM_FAILED');
    assert.doesNotMatch(key.message, /sk-or/);
    assert.equal(
      upstreamError('anthropic', 529, anth('overloaded_error', 'Overloaded'), null).code,
      'UPSTREAM_FAILED',
    );
    assert.equal(upstreamError('openrouter', 502, '<html>bad gateway</html>', null).code, 'UPSTREAM_FAILED');
    assert.equal(
      upstreamError('anthropic', 404, anth('not_found_error', 'model: nope'), null).code,
      'MODEL_NOT_FOUND',
    );
  });
});

describe('gateway: upstream SSE parsing', () => {
  test('events split anywhere across chunks, CRLF, comments, multi-line data', async () => {
    const wire =
      ': OPENROUTER PROCESSING\r\n\r\nevent: a\r\ndata: {"x":1}\r\n\r\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n';
    const bytes = new TextEncoder().encode(wire);
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        // One byte at a time: every boundary is a chunk boundary somewhere.
        for (const b of bytes) c.enqueue(new Uint8Array([b]));
        c.close();
      },
    });
    const call = new UpstreamCall('openrouter', 5000);
    const got = [];
    for await (const e of call.events(new Response(body))) got.push(e);
    assert.deepEqual(got, [
      { event: 'a', data: '{"x":1}' },
      { event: 'message', data: 'line1\nline2' },
      { event: 'message', data: '[DONE]' },
    ]);
  });
});
