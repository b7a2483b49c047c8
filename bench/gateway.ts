/**
 * Model gateway benchmark, against the real daemon (REST on loopback) and the mock provider
 * (test/helpers/mock-llm.ts) in this process. Each figure is the median over N requests, with
 * its ratio against the same request sent straight to the mock: what the gateway adds (auth,
 * validation, translation, the second HTTP hop, the usage row).
 *   - JSON: a claude model (translated both ways) and an OpenRouter model (passed through);
 *   - streaming: the same, time to the last byte of the stream.
 *
 *   npm run bench:gateway [-- --runs 200]
 */
import { parseArgs } from 'node:util';
import { userWithToken } from '../test/helpers/accounts.js';
import { cleanup, startDaemon } from '../test/helpers/daemon.js';
import { anthropicText, gatewayEnv, openaiText, startMockLlm } from '../test/helpers/mock-llm.js';
import { latencyLine, timedRuns } from './bench-lib.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '200' } } });
const runs = Number(values.runs);

const line = (name: string, xs: number[], base?: number[]): void => latencyLine(name, xs, base, 52);
const timed = (n: number, f: () => Promise<unknown>): Promise<number[]> => timedRuns(n, f, 10);

/** Queues the mock's answer (`answer`), then sends the request and reads the whole reply. */
async function post(
  answer: () => void,
  url: string,
  headers: Record<string, string>,
  body: unknown,
): Promise<void> {
  answer();
  const r = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
  });
  await r.arrayBuffer();
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
}

const text = 'The quick brown fox jumps over the lazy dog. '.repeat(8);
const mock = await startMockLlm();
const d = await startDaemon({ env: gatewayEnv(mock) });
try {
  const u = await userWithToken(d, 'bench');
  const auth = { authorization: `Bearer ${u.token}` };
  const messages = [{ role: 'user', content: 'Tell me about foxes.' }];
  const anthropicBody = { model: 'claude-sonnet-4-5', max_tokens: 4096, messages };
  const chatClaude = { model: 'claude-sonnet-4-5', messages };
  const chatOther = { model: 'openai/gpt-4o-mini', messages };
  const key = { 'x-api-key': 'sk-ant-test', 'anthropic-version': '2023-06-01' };
  const orKey = { authorization: 'Bearer sk-or-test' };
  const claude = (): void => mock.queue('anthropic', { response: anthropicText(text) });
  const other = (): void => mock.queue('openai', { response: openaiText(text) });
  const gw = `${d.url}/v1/chat/completions`;

  // What any authenticated request to the daemon costs (one hop, JWT check, no provider).
  const models = await timed(runs, async () => {
    const r = await fetch(`${d.url}/v1/models`, { headers: auth });
    await r.arrayBuffer();
  });
  line('daemon: GET /v1/models (auth + one hop, cached)', models);
  const dj = await timed(runs, () => post(claude, `${mock.url}/v1/messages`, key, anthropicBody));
  line('baseline: POST mock /v1/messages (JSON)', dj);
  const gj = await timed(runs, () => post(claude, gw, auth, chatClaude));
  line('gateway: claude, JSON (translated)', gj, dj);
  const ds = await timed(runs, () =>
    post(claude, `${mock.url}/v1/messages`, key, { ...anthropicBody, stream: true }),
  );
  line('baseline: POST mock /v1/messages (stream)', ds);
  const gs = await timed(runs, () => post(claude, gw, auth, { ...chatClaude, stream: true }));
  line('gateway: claude, streamed (translated)', gs, ds);
  const oj = await timed(runs, () => post(other, `${mock.url}/chat/completions`, orKey, chatOther));
  line('baseline: POST mock /chat/completions (JSON)', oj);
  const goj = await timed(runs, () => post(other, gw, auth, chatOther));
  line('gateway: openrouter, JSON (passed through)', goj, oj);
  const os = await timed(runs, () =>
    post(other, `${mock.url}/chat/completions`, orKey, { ...chatOther, stream: true }),
  );
  line('baseline: POST mock /chat/completions (stream)', os);
  const gos = await timed(runs, () => post(other, gw, auth, { ...chatOther, stream: true }));
  line('gateway: openrouter, streamed (passed through)', gos, os);
} finally {
  await cleanup(d);
  await mock.close();
}
