/**
 * The agents end to end, on real guests, against the model mock (test/helpers/mock-llm.ts):
 * the computer-use agent clicks and types on a real desktop, the shell agent writes a page and
 * starts a server whose preview URL comes back in `done`. NEEDS THE MERGE of the gateway branch
 * (the mock, HUTCH_ANTHROPIC_*) and the desktop branch (screenshot/input, the desktop template).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { AgentEvent } from '../../src/agents/agent-events.js';
import { authed, createMachineAs, userWithToken } from '../helpers/accounts.js';
import {
  agentUrl,
  endTurn,
  type MockLlm,
  message,
  refusal,
  runAgent,
  startMockLlm,
  toolUse,
} from '../helpers/agent-client.js';
import { cleanup, type TestDaemon } from '../helpers/daemon.js';
import { startDesktopDaemon } from '../helpers/desktop.js';

const key = 'sk-ant-test-agents';

/** Runs a shell command in a machine as `token`'s user; the result body. */
async function sh(d: TestDaemon, token: string, id: string, cmd: string, timeoutMs = 30_000) {
  const r = await authed(d.url, 'POST', `/v1/machines/${id}/exec`, { token }, { cmd, timeout_ms: timeoutMs });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body as { exit_code: number; stdout: string; stderr: string };
}

/** Retries `fn` until it returns a value (not undefined) or `ms` pass. */
async function until<T>(what: string, fn: () => Promise<T | undefined>, ms = 60_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

const anthropicCalls = (mock: MockLlm) =>
  mock.requests.filter((r) => r.api === 'anthropic' && r.path.endsWith('/messages'));

describe('agents on real guests', () => {
  let d: TestDaemon;
  let mock: MockLlm;
  let alice: Awaited<ReturnType<typeof userWithToken>>;
  let bob: Awaited<ReturnType<typeof userWithToken>>;
  before(async () => {
    mock = await startMockLlm({ anthropicKey: key });
    d = await startDesktopDaemon({
      HUTCH_REQUIRE_AUTH: '1',
      HUTCH_ANTHROPIC_BASE_URL: mock.anthropicBaseUrl,
      HUTCH_ANTHROPIC_KEY: key,
      HUTCH_AGENT_SETTLE_MS: '500',
    });
    alice = await userWithToken(d, 'alice');
    bob = await userWithToken(d, 'bob');
  });
  after(async () => {
    await cleanup(d);
    await mock.close();
  });

  describe('computer use on a desktop machine', () => {
    let id: string;
    before(async () => {
      id = (await createMachineAs(d.url, alice.token, { template: 'desktop', ttl_seconds: 1200 })).id;
      // Xorg and the xterm come up after the agent: wait for a visible xterm.
      await until(
        'an xterm on the desktop',
        async () => {
          const x = await sh(
            d,
            alice.token,
            id,
            'DISPLAY=:0 xdotool search --onlyvisible --class xterm | head -1',
          );
          return x.exit_code === 0 && x.stdout.trim() ? x.stdout.trim() : undefined;
        },
        180_000,
      );
    });

    test('no token is 401, another user is 404', async () => {
      const url = agentUrl(d.url, `/v1/machines/${id}/agent`, { goal: 'x' });
      assert.equal((await refusal(url)).status, 401);
      const other = await refusal(url, bob.token);
      assert.deepEqual([other.status, other.body.code], [404, 'MACHINE_NOT_FOUND']);
    });

    test('screenshot, click on the xterm, type a command: the screen does it, events stream in order', async () => {
      const geo = await sh(
        d,
        alice.token,
        id,
        'export DISPLAY=:0; w=$(xdotool search --onlyvisible --class xterm | head -1); xdotool getwindowgeometry --shell "$w"; xdpyinfo | grep dimensions',
      );
      const num = (k: string) => Number(new RegExp(`^${k}=(\\d+)`, 'm').exec(geo.stdout)?.[1]);
      const dims = /dimensions:\s+(\d+)x(\d+)/.exec(geo.stdout);
      const screen = { width: Number(dims?.[1] ?? 1024), height: Number(dims?.[2] ?? 768) };
      const scale = Math.min(1, 1280 / screen.width, 800 / screen.height);
      const shown = { width: Math.round(screen.width * scale), height: Math.round(screen.height * scale) };
      // The middle of the xterm, in the model's (scaled) coordinates.
      const real = {
        x: num('X') + Math.floor(num('WIDTH') / 2),
        y: num('Y') + Math.floor(num('HEIGHT') / 2),
      };
      const click = [Math.round(real.x * scale), Math.round(real.y * scale)];
      const expected = {
        x: Math.round((click[0] as number) / scale),
        y: Math.round((click[1] as number) / scale),
      };
      const before = anthropicCalls(mock).length;
      mock.queue(
        'anthropic',
        message([toolUse('computer', { action: 'screenshot' })]),
        message([
          { type: 'text', text: 'Clicking the terminal.' },
          toolUse('computer', { action: 'left_click', coordinate: click }),
        ]),
        message([toolUse('computer', { action: 'type', text: 'echo hutch-was-here > /tmp/agent.txt\n' })]),
        endTurn('The file is written.'),
      );
      const s = await runAgent(
        agentUrl(d.url, `/v1/machines/${id}/agent`, {
          goal: 'write hutch-was-here to /tmp/agent.txt',
          max_steps: '10',
        }),
        alice.token,
      );
      assert.equal((await s.closed).code, 1000);
      const types = s.events.map((e) => e.type);
      assert.deepEqual(types, [
        'start',
        'action',
        'screenshot',
        'result',
        'text',
        'action',
        'screenshot',
        'result',
        'action',
        'screenshot',
        'result',
        'text',
        'done',
      ]);
      const start = s.events[0] as AgentEvent & { type: 'start' };
      assert.equal(start.tool_version, 'computer_20250124');
      const shot = s.events[2] as AgentEvent & { type: 'screenshot' };
      assert.deepEqual([shot.width, shot.height, shot.data], [shown.width, shown.height, undefined]);
      const done = s.events.at(-1) as AgentEvent & { type: 'done' };
      assert.equal(done.outcome, 'completed');
      assert.equal(done.steps, 4);
      assert.deepEqual(done.usage, { input_tokens: 400, output_tokens: 80 });

      // The pointer is where the model clicked, scaled back to the real screen.
      const loc = await sh(d, alice.token, id, 'DISPLAY=:0 xdotool getmouselocation --shell');
      assert.equal(Number(/^X=(\d+)/m.exec(loc.stdout)?.[1]), expected.x, loc.stdout);
      assert.equal(Number(/^Y=(\d+)/m.exec(loc.stdout)?.[1]), expected.y, loc.stdout);
      // The xterm ran what was typed.
      const text = await until(
        '/tmp/agent.txt',
        async () => {
          const r = await sh(d, alice.token, id, 'cat /tmp/agent.txt');
          return r.exit_code === 0 ? r.stdout : undefined;
        },
        20_000,
      );
      assert.equal(text, 'hutch-was-here\n');

      // What the model was sent: the tool at the shown size with its beta, and after each turn one
      // user message of tool results, each ending in a PNG screenshot.
      const calls = anthropicCalls(mock).slice(before);
      assert.equal(calls.length, 4);
      const first = calls[0]?.body as {
        tools: { type: string; display_width_px: number; display_height_px: number }[];
      };
      assert.deepEqual(
        [first.tools[0]?.type, first.tools[0]?.display_width_px, first.tools[0]?.display_height_px],
        ['computer_20250124', shown.width, shown.height],
      );
      assert.match(String(calls[0]?.headers['anthropic-beta']), /computer-use-2025-01-24/);
      assert.equal(calls[0]?.headers['x-api-key'], key);
      for (const c of calls.slice(1)) {
        const msgs = (c.body as { messages: { role: string; content: unknown }[] }).messages;
        const last = msgs.at(-1) as {
          role: string;
          content: {
            type: string;
            content: { type: string; source?: { media_type: string; data: string } }[];
          }[];
        };
        assert.equal(last.role, 'user');
        assert.equal(last.content[0]?.type, 'tool_result');
        const img = last.content[0]?.content.at(-1);
        assert.equal(img?.type, 'image');
        assert.equal(img?.source?.media_type, 'image/png');
        assert.equal(
          Buffer.from(img?.source?.data ?? '', 'base64')
            .subarray(1, 4)
            .toString(),
          'PNG',
        );
      }
    });

    test('a second agent on the same machine is 409 while one runs; stop ends it with done(stopped)', async () => {
      mock.queue('anthropic', { hang: true });
      const url = agentUrl(d.url, `/v1/machines/${id}/agent`, { goal: 'wait' });
      const { openAgent } = await import('../helpers/agent-client.js');
      const s = await openAgent(url, alice.token);
      await s.next('start');
      const second = await refusal(url, alice.token);
      assert.deepEqual([second.status, second.body.code], [409, 'AGENT_BUSY']);
      s.send({ type: 'stop' });
      const done = (await s.next('done')) as AgentEvent & { type: 'done' };
      assert.equal(done.outcome, 'stopped');
      assert.equal((await s.closed).code, 1000);
    });
  });

  describe('the shell agent on a python machine', () => {
    let id: string;
    before(async () => {
      id = (await createMachineAs(d.url, alice.token, { template: 'python', ttl_seconds: 600 })).id;
    });

    test('no token is 401, another user is 404', async () => {
      const url = agentUrl(d.url, `/v1/machines/${id}/shell-agent`, { goal: 'x' });
      assert.equal((await refusal(url)).status, 401);
      const other = await refusal(url, bob.token);
      assert.deepEqual([other.status, other.body.code], [404, 'MACHINE_NOT_FOUND']);
    });

    test('a page written and served: done carries its preview URL, which serves it', async () => {
      const page = '<h1>made by the shell agent</h1>\n';
      mock.queue(
        'anthropic',
        message([toolUse('bash', { command: 'echo hi > /tmp/x' })]),
        message([
          toolUse('str_replace_based_edit_tool', {
            command: 'create',
            path: '/srv/index.html',
            file_text: page,
          }),
        ]),
        message([
          toolUse('bash', {
            command:
              'cd /srv && nohup python3 -m http.server 8000 >/dev/null 2>&1 & for i in $(seq 150); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.2; done',
          }),
        ]),
        endTurn('Serving /srv on port 8000.'),
      );
      const s = await runAgent(
        agentUrl(d.url, `/v1/machines/${id}/shell-agent`, { goal: 'serve a page on port 8000' }),
        alice.token,
      );
      const results = s.events.filter((e) => e.type === 'result') as (AgentEvent & { type: 'result' })[];
      assert.deepEqual(
        results.map((r) => r.ok),
        [true, true, true],
        JSON.stringify(results),
      );
      const done = s.events.at(-1) as AgentEvent & { type: 'done' };
      assert.equal(done.outcome, 'completed', JSON.stringify(s.events));
      assert.equal(done.preview_urls?.length, 1, JSON.stringify(done));
      const url = done.preview_urls?.[0] as string;
      assert.equal(url, new URL(`/v1/machines/${id}/web/8000/`, d.url).href);
      const x = await sh(d, alice.token, id, 'cat /tmp/x');
      assert.equal(x.stdout, 'hi\n');
      const r = await fetch(new URL('index.html', url), {
        headers: { authorization: `Bearer ${alice.token}` },
      });
      assert.equal(r.status, 200);
      assert.equal(await r.text(), page);
      // Each follow-up request answered the tool use before it.
      const calls = anthropicCalls(mock).slice(-4);
      for (const c of calls.slice(1)) {
        const last = (c.body as { messages: { content: { type: string }[] }[] }).messages.at(-1);
        assert.equal(last?.content[0]?.type, 'tool_result');
      }
    });

    test('a stop kills the command the shell agent is running: done(stopped) at once, nothing left', async (t) => {
      mock.queue(
        'anthropic',
        message([toolUse('bash', { command: 'echo started > /tmp/long; exec sleep 300' })]),
      );
      const before = anthropicCalls(mock).length;
      const { openAgent } = await import('../helpers/agent-client.js');
      const s = await openAgent(
        agentUrl(d.url, `/v1/machines/${id}/shell-agent`, { goal: 'run something long' }),
        alice.token,
      );
      await s.next('action');
      // The command runs in the guest before the stop is sent.
      await until('the command to start', async () =>
        (await sh(d, alice.token, id, 'cat /tmp/long 2>/dev/null || true')).stdout === 'started\n'
          ? true
          : undefined,
      );
      const t0 = Date.now();
      s.send({ type: 'stop' });
      const result = (await s.next('result')) as AgentEvent & { type: 'result' };
      const done = (await s.next('done')) as AgentEvent & { type: 'done' };
      const took = Date.now() - t0;
      assert.equal(done.outcome, 'stopped');
      assert.equal(result.ok, false);
      assert.match(result.output ?? '', /stopped: .*killed/);
      t.diagnostic(`done came ${took} ms after the stop`);
      assert.ok(took < 30_000, `done came ${took} ms after the stop (the command would have run 300 s)`);
      assert.equal(anthropicCalls(mock).length, before + 1, 'no model call after the stop');
      const left = await sh(d, alice.token, id, 'cat /proc/[0-9]*/comm 2>/dev/null | grep -x sleep || true');
      assert.equal(left.stdout, '', 'the sleep was killed');
    });

    test('the computer agent on a machine without a display is 409 NO_DISPLAY', async () => {
      const r = await refusal(agentUrl(d.url, `/v1/machines/${id}/agent`, { goal: 'x' }), alice.token);
      assert.deepEqual([r.status, r.body.code], [409, 'NO_DISPLAY']);
    });
  });
});
