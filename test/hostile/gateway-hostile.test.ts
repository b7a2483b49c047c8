/**
 * Hostile clients and a hostile upstream against the model gateway: missing, forged, expired and
 * revoked tokens on every endpoint; huge and malformed bodies; a provider that sends garbage,
 * streams for ever or answers with an enormous body; many streaming clients that vanish. Each
 * must be refused or cut cleanly, the upstream request must end with the client, the daemon's
 * memory must stay bounded, and it must answer health afterwards.
 */
import assert from 'node:assert/strict';
import type { ServerResponse } from 'node:http';
import { after, before, describe, test } from 'node:test';
import { authed, userWithToken } from '../helpers/accounts.js';
import { cleanup, sleep, startDaemon, type TestDaemon, until } from '../helpers/daemon.js';
import { bugLines, memoryOf, Tally } from '../helpers/hostile.js';
import {
  anthropicEvents,
  anthropicText,
  gatewayEnv,
  type MockLlm,
  startMockLlm,
} from '../helpers/mock-llm.js';

const endpoints: [string, string, unknown][] = [
  [
    'POST',
    '/v1/chat/completions',
    { model: 'claude-sonnet-4-5', messages: [{ role: 'user', content: 'x' }] },
  ],
  ['GET', '/v1/models', undefined],
  ['GET', '/v1/usage', undefined],
];

/** A stream that starts like Anthropic's and then pings for ever (until the connection closes). */
function endless(res: ServerResponse): void {
  const [start] = anthropicEvents(anthropicText('x') as never);
  res.writeHead(200, { 'content-type': 'text/event-stream' });
  res.write(`event: message_start\ndata: ${JSON.stringify(start?.data)}\n\n`);
  res.write(
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
  );
  const delta = `event: content_block_delta\ndata: ${JSON.stringify({ type: 'content_block_delta', index: 0, delta: { type: 'text_delta', text: 'y'.repeat(1024) } })}\n\n`;
  const t = setInterval(() => {
    for (let i = 0; i < 16; i++) res.write(delta);
  }, 5);
  res.on('close', () => clearInterval(t));
}

describe('hostile: model gateway', () => {
  const tally = new Tally('gateway');
  let mock: MockLlm;
  let d: TestDaemon;
  let user: Awaited<ReturnType<typeof userWithToken>>;
  const chat = (body: unknown, signal?: AbortSignal): Promise<Response> =>
    fetch(new URL('/v1/chat/completions', d.url), {
      method: 'POST',
      headers: { authorization: `Bearer ${user.token}`, 'content-type': 'application/json' },
      body: typeof body === 'string' ? body : JSON.stringify(body),
      ...(signal ? { signal } : {}),
    });
  const ask = { model: 'claude-sonnet-4-5', messages: [{ role: 'user', content: 'x' }] };

  before(async () => {
    mock = await startMockLlm();
    d = await startDaemon({ env: { ...gatewayEnv(mock), HUTCH_REQUIRE_AUTH: '1' } });
    user = await userWithToken(d, 'victim');
  });
  after(async () => {
    tally.report(`daemon peak ${memoryOf(d.proc.pid as number).peakMb} MiB`);
    await cleanup(d);
    await mock.close();
  });

  test('no, forged, expired and revoked tokens on every endpoint: 401 in both error shapes, nothing upstream', async () => {
    const [head, body] = user.token.split('.') as [string, string, string];
    const short = await authed(
      d.url,
      'POST',
      '/api/v1/tokens',
      { token: user.token },
      { expires_in_secs: 3 },
    );
    const revoked = await authed(d.url, 'POST', '/api/v1/tokens', { token: user.token }, {});
    assert.equal(
      (await authed(d.url, 'DELETE', `/api/v1/tokens/${revoked.body.jti as string}`, { token: user.token }))
        .status,
      204,
    );
    assert.deepEqual([short.status, revoked.status], [201, 201]);
    assert.equal(
      (await authed(d.url, 'GET', '/v1/usage', { token: short.body.token as string })).status,
      200,
    );
    await sleep(3100);
    const before = mock.requests.length;
    const creds: [string, string | undefined][] = [
      ['no token', undefined],
      ['forged signature', `Bearer ${head}.${body}.AAAA`],
      ['garbage', 'Bearer not-a-token'],
      ['expired', `Bearer ${short.body.token as string}`],
      ['revoked', `Bearer ${revoked.body.token as string}`],
      ['an upstream key instead', 'Bearer sk-ant-test'],
    ];
    for (const [method, path, payload] of endpoints)
      for (const [what, header] of creds)
        await tally.check(`${what} on ${method} ${path}`, async () => {
          const r = await authed(d.url, method, path, header === undefined ? {} : { header }, payload);
          assert.equal(r.status, 401);
          assert.equal(r.body.code, 'UNAUTHENTICATED');
          assert.equal((r.body.error as { type?: string })?.type, 'authentication_error');
          return undefined;
        });
    assert.equal(mock.requests.length, before, 'nothing reached the provider');
  });

  test('huge and malformed bodies: 413/400, nothing upstream', async () => {
    const before = mock.requests.length;
    const cases: [string, string, number[]][] = [
      ['21 MiB body', JSON.stringify({ ...ask, pad: 'x'.repeat(21 * 1024 * 1024) }), [413]],
      ['not JSON', '{"model":', [400]],
      ['JSON array', '[1,2,3]', [400]],
      ['model a number', JSON.stringify({ model: 5, messages: [] }), [400]],
      ['messages an object', JSON.stringify({ model: 'claude-x', messages: { role: 'user' } }), [400]],
      [
        'unknown role',
        JSON.stringify({ model: 'claude-x', messages: [{ role: 'root', content: 'x' }] }),
        [400],
      ],
      ['nested 10k deep', `{"model":"claude-x","messages":${'['.repeat(10000)}${']'.repeat(10000)}}`, [400]],
      ['max_tokens negative', JSON.stringify({ ...ask, max_tokens: -1 }), [400]],
      [
        'image not a URL',
        JSON.stringify({
          model: 'claude-x',
          messages: [
            { role: 'user', content: [{ type: 'image_url', image_url: { url: 'file:///etc/passwd' } }] },
          ],
        }),
        [400],
      ],
      [
        'tool arguments not JSON',
        JSON.stringify({
          model: 'claude-x',
          messages: [
            {
              role: 'assistant',
              tool_calls: [{ id: 'a', type: 'function', function: { name: 'f', arguments: '{{' } }],
            },
          ],
        }),
        [400],
      ],
      ['model name of 10 KiB', JSON.stringify({ ...ask, model: 'claude'.padEnd(10240, 'x') }), [400]],
    ];
    for (const [what, raw, statuses] of cases)
      await tally.check(`body: ${what}`, async () => {
        let status: number;
        try {
          const r = await chat(raw);
          status = r.status;
          const b = (await r.json()) as { code?: string; error?: { type?: string } };
          assert.equal(b.error?.type, 'invalid_request_error', JSON.stringify(b).slice(0, 200));
        } catch (e) {
          // A body far over the limit may be cut before it is all sent: refused either way.
          if (what.includes('MiB')) return `cut: ${(e as Error).message}`;
          throw e;
        }
        assert.ok(statuses.includes(status), `status ${status}`);
        return String(status);
      });
    assert.equal(mock.requests.length, before);
  });

  test('a hostile provider: garbage, endless and enormous answers are cut with bounded memory', async () => {
    const rss0 = memoryOf(d.proc.pid as number).rssMb;
    const answers: [string, (res: ServerResponse) => void, boolean, RegExp][] = [
      [
        'SSE that is not JSON',
        (res) => res.writeHead(200, { 'content-type': 'text/event-stream' }).end('data: {{{{\n\n'),
        true,
        /not JSON/,
      ],
      [
        'one SSE line of 64 MiB',
        (res) => {
          res.writeHead(200, { 'content-type': 'text/event-stream' });
          const mb = 'z'.repeat(1024 * 1024);
          let n = 0;
          const more = (): void => {
            while (n < 64 && !res.destroyed) {
              n++;
              if (!res.write(`data: ${mb}`)) return void res.once('drain', more);
            }
            res.end();
          };
          more();
        },
        true,
        /over \d+ bytes/,
      ],
      [
        'binary garbage as SSE',
        (res) =>
          res
            .writeHead(200, { 'content-type': 'text/event-stream' })
            .end(Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919) % 256))),
        true,
        /stream|JSON/,
      ],
      [
        'a stream that stops before message_stop',
        (res) => {
          const evs = anthropicEvents(anthropicText('cut') as never);
          res.writeHead(200, { 'content-type': 'text/event-stream' });
          res.end(`event: message_start\ndata: ${JSON.stringify(evs[0]?.data)}\n\n`);
        },
        true,
        /before message_stop/,
      ],
      [
        'a 200 MiB JSON body',
        (res) => {
          res.writeHead(200, { 'content-type': 'application/json' });
          const mb = `"${'q'.repeat(1024 * 1024 - 2)}",`;
          res.write('{"id":"msg","content":[');
          let n = 0;
          const more = (): void => {
            while (n < 200 && !res.destroyed) {
              n++;
              if (!res.write(mb)) return void res.once('drain', more);
            }
            res.end('""]}');
          };
          more();
        },
        false,
        /over \d+ bytes/,
      ],
      [
        'a JSON body that is a string',
        (res) => res.writeHead(200).end('"hello"'),
        false,
        /not an object|not a message/,
      ],
    ];
    for (const [what, raw, stream, re] of answers)
      await tally.check(`upstream: ${what}`, async () => {
        mock.queue('anthropic', { raw });
        const r = await chat({ ...ask, stream });
        const text = await r.text();
        if (stream) {
          assert.equal(r.status, 200);
          const errLine = text.split('\n').find((l) => l.includes('"error"'));
          assert.ok(errLine, `an error chunk in ${JSON.stringify(text.slice(0, 300))}`);
          assert.match(errLine, re);
          assert.ok(!text.includes('[DONE]'));
        } else {
          assert.equal(r.status, 502, text.slice(0, 300));
          assert.match(text, re);
        }
        return `${r.status}`;
      });
    const rss1 = memoryOf(d.proc.pid as number).rssMb;
    await tally.check('memory after the hostile answers', () => {
      assert.ok(rss1 - rss0 < 200, `RSS grew ${rss0} → ${rss1} MiB`);
      return `${rss0} → ${rss1} MiB`;
    });
  });

  test('many concurrent endless streams whose clients vanish: every upstream request ends, the daemon stays up', async () => {
    const n = 40;
    const first = mock.requests.length;
    for (let i = 0; i < n; i++) mock.queue('anthropic', { raw: endless });
    const rss0 = memoryOf(d.proc.pid as number).rssMb;
    await tally.check(`${n} streams, clients gone at random`, async () => {
      await Promise.all(
        Array.from({ length: n }, async (_, i) => {
          const ac = new AbortController();
          const r = await chat({ ...ask, stream: true }, ac.signal);
          assert.equal(r.status, 200);
          const reader = r.body?.getReader();
          // Some read a little, some read nothing at all (they stop reading, then vanish).
          const reads = i % 3 === 0 ? 0 : 1 + (i % 7);
          for (let k = 0; k < reads; k++) await reader?.read();
          await sleep(50 + ((i * 37) % 400));
          ac.abort();
        }),
      );
      await until(
        'every upstream stream closed',
        () => mock.requests.slice(first).every((q) => q.aborted),
        20_000,
      );
      return undefined;
    });
    const rss1 = memoryOf(d.proc.pid as number).rssMb;
    await tally.check('memory after the vanished streams', () => {
      assert.ok(rss1 - rss0 < 200, `RSS grew ${rss0} → ${rss1} MiB`);
      return `${rss0} → ${rss1} MiB`;
    });
    await tally.check('health and a normal request afterwards', async () => {
      const h = await fetch(new URL('/healthz', d.url));
      assert.equal(h.status, 200);
      mock.queue('anthropic', { response: anthropicText('still here') });
      const r = await chat(ask);
      assert.equal(r.status, 200);
      assert.match(await r.text(), /still here/);
      assert.deepEqual(bugLines(d.log()), []);
      return undefined;
    });
  });
});
