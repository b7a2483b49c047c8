/**
 * Agents benchmark, against the real daemon and the model mock (test/helpers/mock-llm.ts, which
 * answers at once): what one agent step costs beyond the model's time, against the bare call
 * the step is made of, measured in this same process.
 *   - computer agent on a desktop machine, every step a `screenshot` action: step wall time,
 *     its model part (from the result of one step to the action of the next, as the client sees
 *     the events) and the rest, against a bare GET /v1/machines/{id}/screenshot;
 *   - shell agent on a python machine, every step `bash: true`, against a bare POST /exec `true`.
 * Overhead = (step − model part) − bare call: the loop, the tool mapping, the events.
 * Needs the gateway and desktop branches merged (the mock, the screenshot route).
 *
 *   npm run bench:agents [-- --steps 40]
 */
import { parseArgs } from 'node:util';
import type { AgentEvent } from '../src/agents/agent-events.js';
import { authed, userWithToken } from '../test/helpers/accounts.js';
import { agentUrl, endTurn, message, runAgent, startMockLlm, toolUse } from '../test/helpers/agent-client.js';
import { cleanup, type TestDaemon } from '../test/helpers/daemon.js';
import { startDesktopDaemon } from '../test/helpers/desktop.js';
import { latencyLine, median, timedRuns } from './bench-lib.js';

const { values } = parseArgs({ options: { steps: { type: 'string', default: '40' } } });
const steps = Number(values.steps);
const key = 'sk-ant-bench';

const line = (name: string, xs: number[], base?: number[]): void => latencyLine(name, xs, base, 48);
const timed = (n: number, f: () => Promise<unknown>): Promise<number[]> => timedRuns(n, f, 5);

type Timed = AgentEvent & { at?: number };

/** Per step: wall time (action to next action) and its model part (result to next action). */
function stepTimes(events: Timed[]): { step: number[]; model: number[]; tool: number[] } {
  const actions = events.filter((e) => e.type === 'action');
  const results = events.filter((e) => e.type === 'result');
  const out = { step: [] as number[], model: [] as number[], tool: [] as number[] };
  // The first steps warm up; every step but the last has a next action.
  for (let i = 3; i + 1 < actions.length; i++) {
    const a = actions[i]?.at ?? 0;
    const r = results[i]?.at ?? 0;
    const next = actions[i + 1]?.at ?? 0;
    out.step.push(next - a);
    out.model.push(next - r);
    out.tool.push(r - a);
  }
  return out;
}

async function machine(d: TestDaemon, token: string, template: string): Promise<string> {
  const r = await authed(d.url, 'POST', '/v1/machines', { token }, { template, ttl_seconds: 1800 });
  if (r.status !== 201) throw new Error(`create ${template}: ${JSON.stringify(r.body)}`);
  return r.body.id as string;
}

const mock = await startMockLlm({ anthropicKey: key });
const d = await startDesktopDaemon({
  HUTCH_ANTHROPIC_BASE_URL: mock.anthropicBaseUrl,
  HUTCH_ANTHROPIC_KEY: key,
  HUTCH_AGENT_SETTLE_MS: '0',
  HUTCH_REQUIRE_AUTH: '1',
});
try {
  const u = await userWithToken(d, 'bench');
  const auth = { authorization: `Bearer ${u.token}` };

  // Shell agent: `bash: true` steps against a bare exec of `true`.
  const py = await machine(d, u.token, 'python');
  mock.queue(
    'anthropic',
    ...Array.from({ length: steps }, () => message([toolUse('bash', { command: 'true' })])),
    endTurn(),
  );
  const shell = await runAgent(
    agentUrl(d.url, `/v1/machines/${py}/shell-agent`, { goal: 'bench', max_steps: String(steps + 1) }),
    u.token,
  );
  const bareExec = await timed(steps, async () => {
    const r = await authed(d.url, 'POST', `/v1/machines/${py}/exec`, { token: u.token }, { cmd: 'true' });
    if (r.status !== 200) throw new Error(`exec: ${r.status}`);
  });
  const s = stepTimes(shell.events);
  console.log('shell agent (bash: true), model mocked (answers at once):');
  line('  step wall time', s.step);
  line('  model part (result → next action)', s.model);
  line('  tool part (action → result)', s.tool, bareExec);
  line('  bare POST /exec true', bareExec);
  line(
    '  overhead: step − model − bare exec',
    s.step.map((x, i) => x - (s.model[i] ?? 0) - median(bareExec)),
  );

  // Computer agent: `screenshot` steps against a bare screenshot.
  const desk = await machine(d, u.token, 'desktop');
  // The desktop is up once a screenshot is served.
  for (let t = 0; ; t++) {
    const r = await fetch(new URL(`/v1/machines/${desk}/screenshot`, d.url), { headers: auth });
    await r.arrayBuffer();
    if (r.ok) break;
    if (t > 300) throw new Error(`no screenshot: ${r.status}`);
    await new Promise((res) => setTimeout(res, 1000));
  }
  mock.queue(
    'anthropic',
    ...Array.from({ length: steps }, () => message([toolUse('computer', { action: 'screenshot' })])),
    endTurn(),
  );
  const comp = await runAgent(
    agentUrl(d.url, `/v1/machines/${desk}/agent`, { goal: 'bench', max_steps: String(steps + 1) }),
    u.token,
  );
  const bareShot = await timed(steps, async () => {
    const r = await fetch(new URL(`/v1/machines/${desk}/screenshot`, d.url), { headers: auth });
    await r.arrayBuffer();
    if (!r.ok) throw new Error(`screenshot: ${r.status}`);
  });
  const c = stepTimes(comp.events);
  console.log('computer agent (screenshot), model mocked (answers at once):');
  line('  step wall time', c.step);
  line('  model part (result → next action)', c.model);
  line('  tool part (action → result)', c.tool, bareShot);
  line('  bare GET /screenshot', bareShot);
  line(
    '  overhead: step − model − bare screenshot',
    c.step.map((x, i) => x - (c.model[i] ?? 0) - median(bareShot)),
  );
  const done = comp.events.at(-1) as AgentEvent & { type: 'done' };
  console.log(`  done: ${done.outcome}, ${done.steps} steps`);
} finally {
  await cleanup(d);
  await mock.close();
}
