/**
 * Hostile clients and a hostile model against the agents: bad queries, forged tokens, stop
 * spam, clients that vanish mid-step, and a model that sends garbage tool inputs. Every one is
 * refused (400/401/404/409) or becomes an error result or event; the daemon never crashes,
 * every run ends with `done`, and the machine is free for the next agent.
 *
 * The first part needs nothing but a daemon and a guest; the second drives runs with the model
 * mock (test/helpers/mock-llm.ts), on a python machine and on a real desktop.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { AgentEvent } from '../../src/agents/agent-events.js';
import { createMachineAs, userWithToken } from '../helpers/accounts.js';
import {
  agentUrl,
  endTurn,
  type MockLlm,
  message,
  openAgent,
  refusal,
  runAgent,
  startMockLlm,
  toolUse,
} from '../helpers/agent-client.js';
import { cleanup, type TestDaemon } from '../helpers/daemon.js';
import { startDesktopDaemon } from '../helpers/desktop.js';
import { bugLines, memoryOf, processAlive, Tally } from '../helpers/hostile.js';

const key = 'sk-ant-test-hostile';

describe('hostile: agents', () => {
  const tally = new Tally('agents');
  let d: TestDaemon;
  let mock: MockLlm;
  let alice: Awaited<ReturnType<typeof userWithToken>>;
  let bob: Awaited<ReturnType<typeof userWithToken>>;
  let id: string;
  before(async () => {
    mock = await startMockLlm({ anthropicKey: key });
    d = await startDesktopDaemon({
      HUTCH_REQUIRE_AUTH: '1',
      HUTCH_AGENT_MAX_STEPS: '20',
      HUTCH_ANTHROPIC_BASE_URL: mock.anthropicBaseUrl,
      HUTCH_ANTHROPIC_KEY: key,
    });
    alice = await userWithToken(d, 'alice');
    bob = await userWithToken(d, 'bob');
    id = (await createMachineAs(d.url, alice.token, { template: 'python', ttl_seconds: 900 })).id;
  });
  after(async () => {
    const pid = d.proc.pid as number;
    const alive = processAlive(pid);
    const mem = memoryOf(pid);
    const bugs = bugLines(d.log());
    await cleanup(d);
    await mock.close();
    assert.ok(alive, 'the daemon died');
    assert.deepEqual(bugs, []);
    tally.report(`daemon rss ${mem.rssMb} MiB`);
  });

  const url = (path: 'agent' | 'shell-agent', q: Record<string, string>, machine = id) =>
    agentUrl(d.url, `/v1/machines/${machine}/${path}`, q);

  test('bad queries are 400 with the error format, before any upgrade', async () => {
    const cases: [string, Record<string, string>][] = [
      ['no goal', {}],
      ['empty goal', { goal: '' }],
      ['blank goal', { goal: '   ' }],
      ['goal of 4 KiB + 1', { goal: 'x'.repeat(4097) }],
      ['goal of 4 KiB in 3-byte characters', { goal: '€'.repeat(1366) }],
      ['goal with a NUL', { goal: 'a\u0000b' }],
      ['goal with an escape sequence', { goal: 'x\u001b]0;pwned\u0007' }],
      ['max_steps 0', { goal: 'x', max_steps: '0' }],
      ['max_steps -1', { goal: 'x', max_steps: '-1' }],
      ['max_steps 1.5', { goal: 'x', max_steps: '1.5' }],
      ['max_steps word', { goal: 'x', max_steps: 'lots' }],
      ['max_steps over the server cap', { goal: 'x', max_steps: '21' }],
      ['max_steps huge', { goal: 'x', max_steps: '1e308' }],
      ['unknown tool_version', { goal: 'x', tool_version: 'computer_19990101' }],
      ['model of 201 characters', { goal: 'x', model: 'm'.repeat(201) }],
    ];
    for (const path of ['agent', 'shell-agent'] as const)
      for (const [what, q] of cases)
        await tally.check(`${path}: ${what}`, async () => {
          const r = await refusal(url(path, q), alice.token);
          assert.deepEqual([r.status, r.body.code], [400, 'INVALID_ARGUMENT'], JSON.stringify(r));
          assert.equal(typeof (r.body as { message?: unknown }).message, 'string');
          return (r.body as { message: string }).message.slice(0, 80);
        });
    await tally.check('shell-agent: a computer tool_version', async () => {
      const r = await refusal(
        url('shell-agent', { goal: 'x', tool_version: 'computer_20250124' }),
        alice.token,
      );
      assert.equal(r.status, 400);
      return undefined;
    });
  });

  test('forged tokens are 401, another user and unknown machines are 404', async () => {
    const [head, body] = alice.token.split('.') as [string, string, string];
    for (const [what, token] of [
      ['no token', undefined],
      ['garbage', 'not-a-token'],
      ['alg none', `${Buffer.from('{"alg":"none"}').toString('base64url')}.${body}.`],
      ['signature stripped', `${head}.${body}.`],
    ] as const)
      for (const path of ['agent', 'shell-agent'] as const)
        await tally.check(`${path}: ${what}`, async () => {
          const r = await refusal(url(path, { goal: 'x' }), token);
          assert.equal(r.status, 401, JSON.stringify(r));
          return undefined;
        });
    for (const path of ['agent', 'shell-agent'] as const) {
      await tally.check(`${path}: another user's machine`, async () => {
        const r = await refusal(url(path, { goal: 'x' }), bob.token);
        assert.deepEqual([r.status, r.body.code], [404, 'MACHINE_NOT_FOUND']);
        return undefined;
      });
      await tally.check(`${path}: a machine that does not exist`, async () => {
        const r = await refusal(url(path, { goal: 'x' }, 'vm-nope'), alice.token);
        assert.deepEqual([r.status, r.body.code], [404, 'MACHINE_NOT_FOUND']);
        return undefined;
      });
    }
  });

  describe('with a model', () => {
    const done = (evs: AgentEvent[]) => evs.at(-1) as AgentEvent & { type: 'done' };

    test('garbage tool inputs become error results; the run goes on', async () => {
      const m = mock;
      const garbage = [
        toolUse('bash', {}),
        toolUse('bash', { command: 42 }),
        toolUse('bash', { command: 'x'.repeat(70_000) }),
        toolUse('str_replace_based_edit_tool', { command: 'view', path: '../../etc/passwd' }),
        toolUse('str_replace_based_edit_tool', { command: 'str_replace', path: '/nope', old_str: 'a' }),
        toolUse('str_replace_based_edit_tool', { command: 'explode', path: '/tmp' }),
        toolUse('str_replace_based_edit_tool', {
          command: 'create',
          path: '/tmp/big',
          file_text: 'x'.repeat(2 * 1024 * 1024),
        }),
        toolUse('computer', { action: 'left_click', coordinate: [99999, 99999] }),
        toolUse('no_such_tool', { a: 1 }),
      ];
      m.queue(
        'anthropic',
        message(garbage),
        message([toolUse('bash', { command: 'echo still-here' })]),
        endTurn(),
      );
      await tally.check('garbage tool inputs', async () => {
        const s = await runAgent(url('shell-agent', { goal: 'x' }), alice.token);
        const results = s.events.filter((e) => e.type === 'result') as (AgentEvent & { type: 'result' })[];
        assert.deepEqual(
          results.map((r) => r.ok),
          [...garbage.map(() => false), true],
          JSON.stringify(results),
        );
        assert.equal(done(s.events).outcome, 'completed');
        return `${results.length} results`;
      });
    });

    test('garbage computer actions on a real screen: error results, nothing reaches it', async () => {
      const m = mock;
      const desk = (await createMachineAs(d.url, alice.token, { template: 'desktop', ttl_seconds: 900 })).id;
      const garbage = [
        { action: 'left_click', coordinate: [100000, 5] },
        { action: 'left_click', coordinate: [-5, 5] },
        { action: 'left_click', coordinate: [1.5e308, 'x'] },
        { action: 'mouse_move', coordinate: [1, 2, 3] },
        { action: 'type', text: 'y'.repeat(1_000_000) },
        { action: 'type', text: '\u0000\u001b' },
        { action: 'key', text: 'not_a_key_anywhere+ctrl' },
        { action: 'scroll', coordinate: [5, 5], scroll_direction: 'in', scroll_amount: 3 },
        { action: 'scroll', coordinate: [5, 5], scroll_direction: 'down', scroll_amount: 1e9 },
        { action: 'hold_key', text: 'shift', duration: 1e6 },
        { action: 'wait', duration: -1 },
        { action: 'zoom', region: [0, 0, 5, 5] },
        { action: 'teleport' },
        {},
      ];
      m.queue('anthropic', message(garbage.map((g) => toolUse('computer', g))), endTurn());
      await tally.check('garbage computer actions', async () => {
        // The desktop may still be starting: retry while it has no display yet.
        let s: Awaited<ReturnType<typeof runAgent>> | undefined;
        for (let i = 0; i < 120 && !s; i++)
          s = await runAgent(url('agent', { goal: 'x' }, desk), alice.token).catch(
            async (e: { status?: number }) => {
              if (e.status !== 409 && e.status !== 503) throw e;
              await new Promise((res) => setTimeout(res, 1000));
              return undefined;
            },
          );
        if (!s) throw new Error('the desktop never came up');
        const results = s.events.filter((e) => e.type === 'result') as (AgentEvent & { type: 'result' })[];
        // Every one refused, whether by the tool's checks or by the desktop's input (key names,
        // characters it cannot type), except none: `key` with an unknown name is the desktop's call.
        assert.equal(results.length, garbage.length, JSON.stringify(results));
        const notRefused = garbage.filter((_, i) => results[i]?.ok);
        assert.ok(notRefused.length <= 1, JSON.stringify(notRefused));
        assert.equal(done(s.events).outcome, 'completed');
        return `${garbage.length - notRefused.length} refused`;
      });
    });

    test('a model that fails or answers nonsense: error then done(error), never a crash', async () => {
      const m = mock;
      for (const [what, turn] of [
        ['500', { status: 500, body: { type: 'error', error: { type: 'api_error', message: 'boom' } } }],
        [
          '429',
          { status: 429, body: { type: 'error', error: { type: 'rate_limit_error', message: 'slow' } } },
        ],
        [
          'no content',
          { response: { id: 'x', type: 'message', role: 'assistant', model: 'm', stop_reason: 'tool_use' } },
        ],
      ] as const) {
        m.queue('anthropic', turn);
        await tally.check(`model: ${what}`, async () => {
          const s = await runAgent(url('shell-agent', { goal: 'x' }), alice.token);
          assert.equal(s.events.at(-2)?.type, 'error', JSON.stringify(s.events));
          assert.equal(done(s.events).outcome, 'error');
          return (s.events.at(-2) as { code: string }).code;
        });
      }
    });

    test('stop spam ends the run once, with done(stopped)', async () => {
      const m = mock;
      // No turn after it: the stops arrive during the command, so the model is not asked again.
      m.queue('anthropic', message([toolUse('bash', { command: 'sleep 3' })]));
      await tally.check('stop spam', async () => {
        const s = await openAgent(url('shell-agent', { goal: 'x' }), alice.token);
        await s.next('action');
        for (let i = 0; i < 500; i++) s.send({ type: 'stop' });
        for (let i = 0; i < 50; i++) s.ws.send('not json');
        s.ws.send(Buffer.alloc(1000));
        const c = await s.closed;
        assert.equal(c.code, 1000);
        assert.equal(s.events.filter((e) => e.type === 'done').length, 1);
        assert.equal(done(s.events).outcome, 'stopped');
        return undefined;
      });
    });

    test('clients that vanish mid-step free the machine for the next agent', async () => {
      const m = mock;
      /** Runs that have ended, as the daemon logs them (one `agent run` line each). */
      const ended = () =>
        d
          .log()
          .split('\n')
          .filter((l) => l.includes('"msg":"agent run"')).length;
      for (let i = 0; i < 6; i++) {
        const hang = i % 2 === 1;
        m.queue('anthropic', hang ? { hang: true } : message([toolUse('bash', { command: 'sleep 1' })]));
        await tally.check(
          `vanish ${i} (${hang ? 'while the model is asked' : 'while a command runs'})`,
          async () => {
            const before = ended();
            const asked = m.requests.length;
            const s = await openAgent(url('shell-agent', { goal: 'x' }), alice.token);
            await s.next(hang ? 'start' : 'action');
            for (let t = 0; hang && m.requests.length === asked && t < 100; t++)
              await new Promise((r) => setTimeout(r, 50));
            s.ws.terminate();
            // The abandoned run ends by itself: the hung model call is aborted, the command killed.
            for (let t = 0; ended() === before; t++) {
              if (t > 200) throw new Error('the abandoned run did not end');
              await new Promise((r) => setTimeout(r, 50));
            }
            return undefined;
          },
        );
      }
      await tally.check('the machine is free afterwards', async () => {
        m.queue('anthropic', endTurn());
        const s = await runAgent(url('shell-agent', { goal: 'x' }), alice.token);
        assert.equal(done(s.events).outcome, 'completed');
        return undefined;
      });
    });
  });
});
