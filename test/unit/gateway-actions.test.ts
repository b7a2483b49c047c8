import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { localPrincipal } from '../../src/core/principal.js';
import type { AnthropicMessagesRequest } from '../../src/gateway/anthropic-types.js';
import { GatewayActions } from '../../src/gateway/gateway-actions.js';
import { anthropicToolUse, type MockLlm, startMockLlm } from '../helpers/mock-llm.js';

/** The agents' entry point (src/agents/ calls it through Actions), against the mock provider. */
describe('gateway: anthropicMessages for the agents', () => {
  let mock: MockLlm;
  let dir: string;
  let gw: GatewayActions;
  const p = localPrincipal('agent-user', 'token');
  before(async () => {
    mock = await startMockLlm();
    dir = mkdtempSync(join(tmpdir(), 'hutch-gw-'));
    gw = new GatewayActions(
      {
        stateDir: dir,
        anthropicKey: 'sk-ant-test',
        anthropicBaseUrl: mock.anthropicBaseUrl,
        anthropicModels: [],
        openrouterKey: undefined,
        openrouterBaseUrl: mock.openaiBaseUrl,
        gatewayTimeoutMs: 1000,
      },
      () => {},
    );
  });
  after(async () => {
    gw.close();
    rmSync(dir, { recursive: true, force: true });
    await mock.close();
  });

  const req: AnthropicMessagesRequest = {
    model: 'claude-sonnet-4-5',
    max_tokens: 1024,
    system: 'You operate a computer.',
    tools: [
      { type: 'computer_20250124', name: 'computer', display_width_px: 1024, display_height_px: 768 },
      { type: 'bash_20250124', name: 'bash' },
      { type: 'text_editor_20250728', name: 'str_replace_based_edit_tool' },
    ],
    messages: [{ role: 'user', content: 'Open a terminal.' }],
  };

  test('sent as is with the beta header, answered as is, recorded as agent usage', async () => {
    mock.queue('anthropic', { response: anthropicToolUse('computer', { action: 'screenshot' }) });
    const r = await gw.anthropicMessages(p, req, { beta: ['computer-use-2025-01-24'] });
    assert.equal(r.stop_reason, 'tool_use');
    assert.deepEqual(r.content[0], {
      type: 'tool_use',
      id: 'toolu_01A09q90qw90lq917835lq9',
      name: 'computer',
      input: { action: 'screenshot' },
    });
    const sent = mock.requests.at(-1);
    assert.equal(sent?.headers['anthropic-beta'], 'computer-use-2025-01-24');
    assert.deepEqual(sent?.body, { ...req, stream: false });
    assert.deepEqual(gw.usage(p).data, [
      { model: 'claude-sonnet-4-5', requests: 1, prompt_tokens: 30, completion_tokens: 20, total_tokens: 50 },
    ]);
  });

  test('errors are HutchErrors; an abort cuts the request', async () => {
    mock.queue('anthropic', {
      status: 429,
      body: { type: 'error', error: { type: 'rate_limit_error', message: 'slow' } },
    });
    await assert.rejects(gw.anthropicMessages(p, req, {}), { code: 'UPSTREAM_RATE_LIMITED' });
    mock.queue('anthropic', { hang: true });
    await assert.rejects(gw.anthropicMessages(p, req, {}), { code: 'UPSTREAM_TIMEOUT' });
    mock.queue('anthropic', { hang: true });
    const ac = new AbortController();
    const call = gw.anthropicMessages(p, req, { signal: ac.signal });
    setTimeout(() => ac.abort(), 100);
    await assert.rejects(call);
    await assert.rejects(
      gw.chatCompletions(p, { model: 'gpt-4o', messages: [{ role: 'user', content: 'x' }] }),
      {
        code: 'MODEL_NOT_FOUND',
      },
    );
  });

  test('an unreachable Anthropic model list falls back to HUTCH_ANTHROPIC_MODELS; no key lists nothing', async () => {
    const other = mkdtempSync(join(tmpdir(), 'hutch-gw-'));
    const warnings: string[] = [];
    const g = new GatewayActions(
      {
        stateDir: other,
        anthropicKey: 'sk-ant-test',
        anthropicBaseUrl: 'http://127.0.0.1:1',
        anthropicModels: ['claude-fallback-1'],
        openrouterKey: undefined,
        openrouterBaseUrl: mock.openaiBaseUrl,
        gatewayTimeoutMs: 1000,
      },
      (_level, msg) => warnings.push(msg),
    );
    try {
      const list = await g.listModels(p);
      assert.deepEqual(list, {
        object: 'list',
        data: [{ id: 'claude-fallback-1', object: 'model', created: 0, owned_by: 'anthropic' }],
      });
      assert.equal(warnings.length, 1);
    } finally {
      g.close();
      rmSync(other, { recursive: true, force: true });
    }
  });
});

describe('gateway: configuration', () => {
  test('defaults, HUTCH_* keys, and BORING_OPENROUTER_KEY only when HUTCH_OPENROUTER_KEY is unset', () => {
    const c = loadConfig({}, {});
    assert.equal(c.anthropicKey, undefined);
    assert.equal(c.anthropicBaseUrl, 'https://api.anthropic.com');
    assert.equal(c.openrouterBaseUrl, 'https://openrouter.ai/api/v1');
    assert.equal(c.gatewayTimeoutMs, 120_000);
    assert.deepEqual(c.anthropicModels, []);
    const e = loadConfig(
      {},
      {
        HUTCH_ANTHROPIC_KEY: 'a',
        HUTCH_ANTHROPIC_BASE_URL: 'http://127.0.0.1:9/',
        HUTCH_ANTHROPIC_MODELS: 'claude-a, claude-b',
        BORING_OPENROUTER_KEY: 'boring',
        HUTCH_GATEWAY_TIMEOUT_MS: '5000',
      },
    );
    assert.deepEqual(
      [e.anthropicKey, e.anthropicBaseUrl, e.anthropicModels, e.openrouterKey, e.gatewayTimeoutMs],
      ['a', 'http://127.0.0.1:9', ['claude-a', 'claude-b'], 'boring', 5000],
    );
    assert.equal(
      loadConfig({}, { HUTCH_OPENROUTER_KEY: 'own', BORING_OPENROUTER_KEY: 'boring' }).openrouterKey,
      'own',
    );
    assert.throws(() => loadConfig({}, { HUTCH_ANTHROPIC_BASE_URL: 'not a url' }), /anthropicBaseUrl/);
  });
});
