import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { AgentActions, type AgentHandle, type StartAgentRequest } from '../../src/agents/agent-actions.js';
import type { AgentEvent } from '../../src/agents/agent-events.js';
import type { AgentHost, ShellResult } from '../../src/agents/agent-host.js';
import { AgentRun, type AgentRunConfig } from '../../src/agents/agent-loop.js';
import { fitScale, type ScreenGeometry } from '../../src/agents/computer-tool.js';
import type {
  AnthropicMessagesRequest,
  AnthropicMessagesResponse,
  ContentBlock,
  ToolResultBlock,
} from '../../src/agents/model-types.js';
import type { Actions } from '../../src/core/dispatch.js';
import type { Principal } from '../../src/core/principal.js';
import type { InputAction, ScreenshotOptions } from '../../src/desktop/input-types.js';
import { HutchError } from '../../src/errors.js';

/** What the fake model does on one turn: answer, or anything a function does with the call. */
type Turn =
  | AnthropicMessagesResponse
  | ((req: AnthropicMessagesRequest, signal: AbortSignal) => Promise<AnthropicMessagesResponse>);

const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);

function reply(content: ContentBlock[], stop = 'tool_use'): AnthropicMessagesResponse {
  return {
    id: 'msg_1',
    model: 'claude-test',
    role: 'assistant',
    content,
    stop_reason: stop,
    usage: { input_tokens: 10, output_tokens: 5 },
  };
}
let n = 0;
const use = (name: string, input: unknown): ContentBlock => ({
  type: 'tool_use',
  id: `tu_${++n}`,
  name,
  input,
});
const computer = (input: Record<string, unknown>): AnthropicMessagesResponse =>
  reply([use('computer', input)]);
const endTurn = (text = 'done'): AnthropicMessagesResponse => reply([{ type: 'text', text }], 'end_turn');

/** A host that records what the loop did: the screen is `screen`, files live in a Map. */
class FakeHost implements AgentHost {
  requests: AnthropicMessagesRequest[] = [];
  signals: AbortSignal[] = [];
  betas: string[][] = [];
  inputs: InputAction[][] = [];
  shots: ScreenshotOptions[] = [];
  scripts: { script: string; stdin?: string | undefined; args?: string[] | undefined }[] = [];
  files = new Map<string, string>();
  ports: number[] = [22];
  closed = 0;
  execResult: (stdin: string | undefined) => ShellResult = () => ({
    exitCode: 0,
    stdout: 'ok\n',
    stderr: '',
    timedOut: false,
    truncated: false,
  });
  inputDelay = 0;

  constructor(
    private readonly turns: Turn[],
    readonly screen = { width: 1024, height: 768 },
  ) {}

  async model(req: AnthropicMessagesRequest, opts: { signal: AbortSignal; beta: string[] }) {
    this.requests.push(JSON.parse(JSON.stringify(req)));
    this.signals.push(opts.signal);
    this.betas.push(opts.beta);
    const t = this.turns.shift();
    if (!t) throw new Error('the script ran out');
    return typeof t === 'function' ? t(req, opts.signal) : t;
  }
  async screenshot(opts: ScreenshotOptions) {
    this.shots.push(opts);
    const s = opts.maxWidth ? opts.maxWidth / this.screen.width : (opts.scale ?? 1);
    return {
      png,
      width: Math.round(this.screen.width * s),
      height: Math.round(this.screen.height * s),
      screen: this.screen,
    };
  }
  async input(actions: InputAction[]) {
    this.inputs.push(actions);
    if (this.inputDelay) await new Promise((r) => setTimeout(r, this.inputDelay));
    return { cursor: { x: 40, y: 30 } };
  }
  /** Commands run until their signal aborts them (a command killed: no exit code). */
  execHangs = false;
  execSignals: (AbortSignal | undefined)[] = [];
  async exec(
    script: string,
    opts: { stdin?: string; args?: string[]; timeoutMs: number; signal?: AbortSignal },
  ): Promise<ShellResult> {
    this.scripts.push({ script, stdin: opts.stdin, args: opts.args });
    this.execSignals.push(opts.signal);
    if (this.execHangs) {
      await new Promise((r) => opts.signal?.addEventListener('abort', r, { once: true }));
      return { exitCode: null, stdout: 'partial\n', stderr: '', timedOut: false, truncated: false };
    }
    return this.execResult(opts.stdin);
  }
  async readFile(path: string) {
    const f = this.files.get(path);
    if (f === undefined) throw new HutchError('FILE_NOT_FOUND', `${path}: no such file`);
    return Buffer.from(f);
  }
  async writeFile(path: string, data: Buffer) {
    this.files.set(path, data.toString());
  }
  async listeningPorts() {
    return this.ports;
  }
  previewUrl(port: number) {
    return `http://api.test/v1/machines/m1/web/${port}/`;
  }
  close() {
    this.closed++;
  }
}

function geometry(screen: { width: number; height: number }): ScreenGeometry {
  const s = fitScale(screen);
  return { width: Math.round(screen.width * s), height: Math.round(screen.height * s), screen };
}

function cfg(over: Partial<AgentRunConfig> = {}): AgentRunConfig {
  return {
    kind: 'computer',
    goal: 'do the thing',
    model: 'claude-test',
    toolVersion: 'computer_20250124',
    maxSteps: 10,
    timeLimitMs: 10_000,
    runId: 'run1',
    geometry: geometry({ width: 1024, height: 768 }),
    ...over,
  };
}

async function runAll(run: AgentRun): Promise<AgentEvent[]> {
  const p = run.run();
  const out: AgentEvent[] = [];
  for await (const e of run.events) out.push(e);
  await p;
  return out;
}

/** The text of a tool result's first block ('' if it has none). */
const textOf = (r: ToolResultBlock | undefined): string => {
  const b = r?.content[0];
  return b?.type === 'text' ? b.text : '';
};
const done = (evs: AgentEvent[]) => evs.at(-1) as AgentEvent & { type: 'done' };
const lastResults = (req: AnthropicMessagesRequest | undefined): ToolResultBlock[] =>
  (req?.messages.at(-1)?.content as ToolResultBlock[]) ?? [];

describe('agent loop: computer use', () => {
  it('maps every action to the real screen, scaling the model coordinates back', async () => {
    const screen = { width: 2560, height: 1600 };
    const host = new FakeHost(
      [
        computer({ action: 'left_click', coordinate: [100, 200] }),
        computer({ action: 'left_click', coordinate: [10, 10], text: 'shift' }),
        computer({ action: 'double_click', coordinate: [1, 2] }),
        computer({ action: 'triple_click' }),
        computer({ action: 'right_click', coordinate: [3, 4] }),
        computer({ action: 'middle_click', coordinate: [5, 6] }),
        computer({ action: 'mouse_move', coordinate: [640, 400] }),
        computer({ action: 'left_click_drag', start_coordinate: [0, 0], coordinate: [1279, 799] }),
        computer({ action: 'left_mouse_down', coordinate: [7, 8] }),
        computer({ action: 'left_mouse_up' }),
        computer({ action: 'scroll', coordinate: [50, 60], scroll_direction: 'down', scroll_amount: 5 }),
        computer({ action: 'key', text: 'ctrl+s' }),
        computer({ action: 'type', text: 'hello\n' }),
        computer({ action: 'hold_key', text: 'shift', duration: 0.01 }),
        computer({ action: 'cursor_position' }),
        computer({ action: 'wait', duration: 0.01 }),
        endTurn(),
      ],
      screen,
    );
    const evs = await runAll(new AgentRun(host, cfg({ geometry: geometry(screen), maxSteps: 50 })));
    assert.equal(done(evs).outcome, 'completed');
    const tool = host.requests[0]?.tools?.[0];
    assert.deepEqual(tool, {
      type: 'computer_20250124',
      name: 'computer',
      display_width_px: 1280,
      display_height_px: 800,
    });
    assert.deepEqual(host.betas[0], ['computer-use-2025-01-24']);
    assert.deepEqual(host.inputs, [
      [{ type: 'click', x: 200, y: 400, button: 'left', count: 1 }],
      [
        { type: 'key_down', keys: 'shift' },
        { type: 'click', x: 20, y: 20, button: 'left', count: 1 },
        { type: 'key_up', keys: 'shift' },
      ],
      [{ type: 'click', x: 2, y: 4, button: 'left', count: 2 }],
      [{ type: 'click', button: 'left', count: 3 }],
      [{ type: 'click', x: 6, y: 8, button: 'right', count: 1 }],
      [{ type: 'click', x: 10, y: 12, button: 'middle', count: 1 }],
      [{ type: 'move', x: 1280, y: 800 }],
      [
        { type: 'down', x: 0, y: 0, button: 'left' },
        { type: 'move', x: 2558, y: 1598 },
        { type: 'up', x: 2558, y: 1598, button: 'left' },
      ],
      [{ type: 'down', x: 14, y: 16, button: 'left' }],
      [{ type: 'up', button: 'left' }],
      [{ type: 'scroll', x: 100, y: 120, direction: 'down', amount: 5 }],
      [{ type: 'key', keys: 'ctrl+s' }],
      [{ type: 'type', text: 'hello\n' }],
      [
        { type: 'key_down', keys: 'shift' },
        { type: 'wait', ms: 10 },
        { type: 'key_up', keys: 'shift' },
      ],
      // cursor_position asks where the pointer is (no action), then answers in the model's space.
      [],
    ]);
    const cursor = lastResults(host.requests[15])[0];
    assert.deepEqual(cursor?.content, [{ type: 'text', text: 'X=20,Y=15' }]);
    // Screenshots after input are taken at the scale the model sees.
    assert.deepEqual(host.shots[0], { maxWidth: 1280 });
    assert.equal(done(evs).steps, 17);
  });

  it('answers every tool use with a result ending in a PNG screenshot, and streams events in order', async () => {
    const host = new FakeHost([
      computer({ action: 'screenshot' }),
      reply([
        { type: 'text', text: 'clicking' },
        use('computer', { action: 'left_click', coordinate: [5, 5] }),
      ]),
      endTurn('all done'),
    ]);
    const evs = await runAll(new AgentRun(host, cfg()));
    assert.deepEqual(
      evs.map((e) => e.type),
      ['start', 'action', 'screenshot', 'result', 'text', 'action', 'screenshot', 'result', 'text', 'done'],
    );
    for (const req of host.requests.slice(1)) {
      const r = lastResults(req);
      assert.equal(r.length, 1);
      const img = r[0]?.content.at(-1);
      assert.equal(img?.type, 'image');
      assert.equal(img?.type === 'image' && img.source.media_type, 'image/png');
      assert.equal(img?.type === 'image' && img.source.data, png.toString('base64'));
      const asked = ((req.messages.at(-2)?.content ?? []) as ContentBlock[]).find(
        (b) => b.type === 'tool_use',
      );
      assert.equal(r[0]?.tool_use_id, asked?.type === 'tool_use' && asked.id);
    }
    const shot = evs.find((e) => e.type === 'screenshot');
    assert.deepEqual(shot, { type: 'screenshot', step: 1, width: 1024, height: 768 });
    assert.deepEqual(done(evs), {
      type: 'done',
      outcome: 'completed',
      steps: 3,
      usage: { input_tokens: 30, output_tokens: 15 },
    });
    assert.equal(host.closed, 1);
  });

  it('puts the PNG in screenshot events only when asked', async () => {
    const host = new FakeHost([computer({ action: 'screenshot' }), endTurn()]);
    const evs = await runAll(new AgentRun(host, cfg({ inlineScreenshots: true })));
    const shot = evs.find((e) => e.type === 'screenshot');
    assert.equal(shot?.type === 'screenshot' && shot.data, png.toString('base64'));
  });

  it('keeps only the newest screenshots in the conversation', async () => {
    const turns: Turn[] = [];
    for (let i = 0; i < 6; i++) turns.push(computer({ action: 'screenshot' }));
    turns.push(endTurn());
    const host = new FakeHost(turns);
    await runAll(new AgentRun(host, cfg({ keepImages: 2 })));
    const last = host.requests.at(-1);
    const images = JSON.stringify(last).split('"type":"image"').length - 1;
    assert.equal(images, 2);
  });

  it('stops at the step limit', async () => {
    const host = new FakeHost(Array.from({ length: 10 }, () => computer({ action: 'screenshot' })));
    const evs = await runAll(new AgentRun(host, cfg({ maxSteps: 3 })));
    assert.equal(done(evs).outcome, 'step_limit');
    assert.equal(done(evs).steps, 3);
    assert.equal(host.requests.length, 3);
  });

  it('stops at the time limit, aborting the model call', async () => {
    const host = new FakeHost([
      (_req, signal) =>
        new Promise((_r, reject) => signal.addEventListener('abort', () => reject(new Error('aborted')))),
    ]);
    const evs = await runAll(new AgentRun(host, cfg({ timeLimitMs: 50 })));
    assert.equal(done(evs).outcome, 'time_limit');
    assert.equal(host.signals[0]?.aborted, true);
  });

  it('on stop, finishes the current action, then done(stopped) with no further model call', async () => {
    const host = new FakeHost([
      computer({ action: 'left_click', coordinate: [1, 1] }),
      computer({ action: 'screenshot' }),
    ]);
    host.inputDelay = 50;
    const run = new AgentRun(host, cfg());
    const p = runAll(run);
    await new Promise((r) => setTimeout(r, 20));
    run.stop();
    run.stop();
    const evs = await p;
    assert.equal(done(evs).outcome, 'stopped');
    assert.equal(host.inputs.length, 1, 'the click in progress finished');
    assert.equal(host.requests.length, 1);
    assert.equal(evs.filter((e) => e.type === 'done').length, 1);
  });

  it('a stop during the model call aborts it', async () => {
    const host = new FakeHost([
      (_req, signal) =>
        new Promise((_r, reject) => signal.addEventListener('abort', () => reject(new Error('aborted')))),
    ]);
    const run = new AgentRun(host, cfg());
    const p = runAll(run);
    await new Promise((r) => setTimeout(r, 10));
    run.stop();
    const evs = await p;
    assert.equal(done(evs).outcome, 'stopped');
    assert.equal(host.signals[0]?.aborted, true);
  });

  it('a client that goes away aborts the in-flight model call', async () => {
    const host = new FakeHost([
      (_req, signal) =>
        new Promise((_r, reject) => signal.addEventListener('abort', () => reject(new Error('aborted')))),
    ]);
    const run = new AgentRun(host, cfg());
    const p = runAll(run);
    await new Promise((r) => setTimeout(r, 10));
    run.cancel();
    const evs = await p;
    assert.equal(host.signals[0]?.aborted, true);
    assert.equal(done(evs).outcome, 'stopped');
    assert.equal(evs.filter((e) => e.type === 'error').length, 0);
    assert.equal(host.closed, 1);
  });

  it('a model error is an error event, then done(error)', async () => {
    const host = new FakeHost([
      computer({ action: 'screenshot' }),
      async () => {
        throw new HutchError('UPSTREAM_RATE_LIMITED', 'slow down');
      },
    ]);
    const evs = await runAll(new AgentRun(host, cfg()));
    const err = evs.at(-2);
    assert.deepEqual(err, { type: 'error', code: 'UPSTREAM_RATE_LIMITED', message: 'slow down' });
    assert.equal(done(evs).outcome, 'error');
    assert.equal(done(evs).steps, 1);
    assert.deepEqual(done(evs).usage, { input_tokens: 10, output_tokens: 5 });
  });

  it('a model answer without content is an error, not a crash', async () => {
    const host = new FakeHost([{ id: 'x', model: 'm', role: 'assistant', stop_reason: 'tool_use' } as never]);
    const evs = await runAll(new AgentRun(host, cfg()));
    assert.equal(done(evs).outcome, 'error');
    assert.equal(evs.at(-2)?.type, 'error');
  });

  it('garbage tool inputs become error results; nothing reaches the screen', async () => {
    const bad = [
      { action: 'left_click', coordinate: [1024, 10] },
      { action: 'left_click', coordinate: [-1, 10] },
      { action: 'left_click', coordinate: ['a', 1] },
      { action: 'mouse_move' },
      { action: 'fly' },
      { action: 'zoom', region: [0, 0, 10, 10] },
      { action: 'type', text: 'x'.repeat(100_000) },
      { action: 'type', text: 42 },
      { action: 'scroll', scroll_direction: 'sideways' },
      { action: 'wait', duration: 1e9 },
      { action: 'left_click_drag', coordinate: [1, 1] },
      'not an object',
      null,
    ];
    const host = new FakeHost([
      reply(bad.map((b) => use('computer', b))),
      reply([use('no_such_tool', {})]),
      endTurn(),
    ]);
    const evs = await runAll(new AgentRun(host, cfg()));
    assert.equal(done(evs).outcome, 'completed');
    assert.equal(host.inputs.length, 0);
    const results = lastResults(host.requests[1]);
    assert.equal(results.length, bad.length);
    for (const r of results) assert.equal(r.is_error, true, JSON.stringify(r));
    assert.equal(lastResults(host.requests[2])[0]?.is_error, true);
    // The huge input is echoed clipped.
    const typed = evs.find((e) => e.type === 'action' && JSON.stringify(e.input).length > 8000 + 1000);
    assert.equal(typed, undefined);
  });

  it('zoom is served on computer_20251124 with its beta header: the region, cropped on the host', async () => {
    const host = new FakeHost([computer({ action: 'zoom', region: [10, 20, 110, 70] }), endTurn()]);
    await runAll(new AgentRun(host, cfg({ toolVersion: 'computer_20251124' })));
    assert.deepEqual(host.shots.at(-1), { region: { x: 10, y: 20, width: 100, height: 50 }, maxWidth: 1024 });
    assert.deepEqual(host.betas[0], ['computer-use-2025-11-24']);
    assert.equal(host.requests[0]?.tools?.[0]?.type, 'computer_20251124');
    const r = lastResults(host.requests[1])[0];
    assert.notEqual(r?.is_error, true);
    assert.equal(r?.content.at(-1)?.type, 'image');
  });

  it('a machine that went away ends the run with an error', async () => {
    const host = new FakeHost([computer({ action: 'left_click', coordinate: [1, 1] })]);
    host.input = async () => {
      throw new HutchError('MACHINE_NOT_RUNNING', 'machine m1 is suspended');
    };
    const evs = await runAll(new AgentRun(host, cfg()));
    assert.equal(done(evs).outcome, 'error');
    assert.equal(evs.at(-2)?.type === 'error' && evs.at(-2)?.type, 'error');
  });

  it('probes the screen itself when not given its geometry', async () => {
    const host = new FakeHost([endTurn()], { width: 1920, height: 1080 });
    await runAll(new AgentRun(host, cfg({ geometry: undefined })));
    const tool = host.requests[0]?.tools?.[0];
    assert.equal(tool?.type === 'computer_20250124' && tool.display_width_px, 1280);
    assert.equal(tool?.type === 'computer_20250124' && tool.display_height_px, 720);
  });
});

describe('agent loop: shell tools', () => {
  const shell = (over: Partial<AgentRunConfig> = {}): AgentRunConfig =>
    cfg({ kind: 'shell', toolVersion: 'bash_20250124', geometry: undefined, ...over });

  it('offers bash and the editor, runs commands through exec with state carried over', async () => {
    const host = new FakeHost([reply([use('bash', { command: 'echo hi > /tmp/x' })]), endTurn()]);
    const evs = await runAll(new AgentRun(host, shell()));
    assert.deepEqual(
      host.requests[0]?.tools?.map((t) => t.type),
      ['bash_20250124', 'text_editor_20250728'],
    );
    assert.deepEqual(host.betas[0], []);
    assert.equal(host.scripts[0]?.stdin, 'echo hi > /tmp/x');
    assert.match(host.scripts[0]?.script ?? '', /eval "\$__hutch_cmd"/);
    assert.match(host.scripts[0]?.script ?? '', /\/tmp\/\.hutch-agent-run1\.cwd/);
    const result = evs.find((e) => e.type === 'result');
    assert.deepEqual(result, { type: 'result', step: 1, ok: true, output: 'ok\n' });
  });

  for (const [how, end, outcome] of [
    ['a stop', (run: AgentRun) => run.stop(), 'stopped'],
    ['the time limit', () => {}, 'time_limit'],
    ['a client that goes away', (run: AgentRun) => run.cancel(), 'stopped'],
  ] as const)
    it(`${how} kills the bash command in flight, and the run ends`, async () => {
      const host = new FakeHost([reply([use('bash', { command: 'sleep 999' })]), endTurn()]);
      host.execHangs = true;
      const run = new AgentRun(host, shell({ timeLimitMs: outcome === 'time_limit' ? 60 : 60_000 }));
      const p = runAll(run);
      await new Promise((r) => setTimeout(r, 20));
      end(run);
      const evs = await p;
      assert.equal(done(evs).outcome, outcome);
      assert.equal(host.execSignals[0]?.aborted, true, 'the command was killed');
      assert.equal(host.requests.length, 1, 'no model call after it');
      if (how !== 'a client that goes away') {
        const r = evs.find((e) => e.type === 'result') as { ok: boolean; output: string } | undefined;
        assert.equal(r?.ok, false);
        assert.match(r?.output ?? '', /partial\n\[stopped: .*killed/);
      }
    });

  it('bash: restart, exit codes, truncation, timeouts', async () => {
    const host = new FakeHost([
      reply([
        use('bash', { restart: true }),
        use('bash', { command: 'false' }),
        use('bash', { command: 'big' }),
        use('bash', { command: 'sleep 999' }),
        use('bash', {}),
      ]),
      endTurn(),
    ]);
    host.execResult = (stdin) => {
      if (stdin === 'false')
        return { exitCode: 1, stdout: '', stderr: 'nope', timedOut: false, truncated: false };
      if (stdin === 'big')
        return { exitCode: 0, stdout: 'a'.repeat(100_000), stderr: '', timedOut: false, truncated: false };
      if (stdin === 'sleep 999')
        return { exitCode: null, stdout: '', stderr: '', timedOut: true, truncated: false };
      return { exitCode: 0, stdout: '', stderr: '', timedOut: false, truncated: false };
    };
    await runAll(new AgentRun(host, shell()));
    assert.equal(host.scripts[0]?.script, "rm -f '/tmp/.hutch-agent-run1.env' '/tmp/.hutch-agent-run1.cwd'");
    const r = lastResults(host.requests[1]);
    const text = (i: number) => textOf(r[i]);
    assert.equal(text(0), 'tool has been restarted.');
    assert.match(text(1), /nope\n\[exit code 1\]/);
    assert.ok(text(2).length < 17_000);
    assert.match(text(2), /characters omitted/);
    assert.equal(r[3]?.is_error, true);
    assert.match(text(3), /timed out/);
    assert.equal(r[4]?.is_error, true);
  });

  it('editor: create, view (numbers, view_range), str_replace only on exactly one match, insert', async () => {
    const ed = (input: Record<string, unknown>) => use('str_replace_based_edit_tool', input);
    const host = new FakeHost([
      reply([
        ed({ command: 'create', path: '/srv/a.txt', file_text: 'one\ntwo\ntwo\nthree' }),
        ed({ command: 'view', path: '/srv/a.txt' }),
        ed({ command: 'view', path: '/srv/a.txt', view_range: [2, 3] }),
        ed({ command: 'str_replace', path: '/srv/a.txt', old_str: 'two', new_str: 'TWO' }),
        ed({ command: 'str_replace', path: '/srv/a.txt', old_str: 'four', new_str: 'x' }),
        ed({ command: 'str_replace', path: '/srv/a.txt', old_str: 'three', new_str: '3' }),
        ed({ command: 'insert', path: '/srv/a.txt', insert_line: 1, insert_text: 'one and a half' }),
        ed({ command: 'view', path: '/srv/nope' }),
        ed({ command: 'view', path: 'relative' }),
        ed({ command: 'view', path: '/srv/a.txt', view_range: [0, 99] }),
        ed({ command: 'undo_edit', path: '/srv/a.txt' }),
      ]),
      endTurn(),
    ]);
    await runAll(new AgentRun(host, shell()));
    const r = lastResults(host.requests[1]);
    const text = (i: number) => textOf(r[i]);
    assert.equal(r[0]?.is_error, undefined);
    assert.equal(text(1), '     1\tone\n     2\ttwo\n     3\ttwo\n     4\tthree');
    assert.equal(text(2), '     2\ttwo\n     3\ttwo');
    assert.equal(r[3]?.is_error, true);
    assert.match(text(3), /more than once.*lines 2 and 3/);
    assert.equal(r[4]?.is_error, true);
    assert.match(text(4), /not found/);
    assert.equal(r[5]?.is_error, undefined);
    assert.equal(host.files.get('/srv/a.txt'), 'one\none and a half\ntwo\ntwo\n3');
    for (const i of [7, 8, 9, 10]) assert.equal(r[i]?.is_error, true, text(i));
  });

  it('the final event carries the preview URLs of servers the run started', async () => {
    const host = new FakeHost([
      reply([use('bash', { command: 'nohup python3 -m http.server 8000 &' })]),
      async () => {
        host.ports = [22, 8000];
        return endTurn();
      },
    ]);
    const evs = await runAll(new AgentRun(host, shell({ portsBefore: [22] })));
    assert.deepEqual(done(evs).preview_urls, ['http://api.test/v1/machines/m1/web/8000/']);
  });

  it('no new server, no preview_urls', async () => {
    const host = new FakeHost([endTurn()]);
    const evs = await runAll(new AgentRun(host, shell({ portsBefore: [22] })));
    assert.equal(done(evs).preview_urls, undefined);
  });

  it('the computer tool is not served to the shell agent', async () => {
    const host = new FakeHost([computer({ action: 'screenshot' }), endTurn()]);
    await runAll(new AgentRun(host, shell()));
    assert.equal(lastResults(host.requests[1])[0]?.is_error, true);
    assert.equal(host.shots.length, 0);
  });
});

describe('AgentActions: one run per machine, as its principal', () => {
  const settings = {
    agentModel: 'claude-default',
    agentToolVersion: 'computer_20250124' as const,
    agentMaxSteps: 20,
    agentTimeLimitMs: 10_000,
    agentSettleMs: 0,
  };
  const principal = { user: 'alice', via: 'token' } as unknown as Principal;

  /** Actions of a principal with one machine `m1` (a desktop unless `display` is false). */
  function fakeActions(o: { display?: boolean; model?: Turn[] } = {}) {
    const calls = { sessions: 0, released: 0, beta: [] as string[][], users: [] as string[] };
    const turns = o.model ?? [];
    const act = {
      get: (id: string) => {
        if (id !== 'm1' && id !== 'named') throw new HutchError('MACHINE_NOT_FOUND', `no machine ${id}`);
        return { id: 'm1' };
      },
      screenshot: async () => {
        if (o.display === false) throw new HutchError('NO_DISPLAY', 'm1 has no display');
        return { png, width: 1024, height: 768, screen: { width: 1024, height: 768 } };
      },
      input: async () => ({ cursor: { x: 0, y: 0 } }),
      listeningPorts: async () => [22],
      openSession: async () => {
        calls.sessions++;
        return { id: 'm1', release: () => calls.released++ };
      },
      anthropicMessages: async (
        req: AnthropicMessagesRequest,
        opts: { beta?: string[]; signal?: AbortSignal },
      ) => {
        calls.beta.push(opts.beta ?? []);
        const t = turns.shift() ?? endTurn();
        return typeof t === 'function' ? t(req, opts.signal as AbortSignal) : t;
      },
    };
    return { act: act as unknown as Actions, calls };
  }
  const req = (over: Partial<StartAgentRequest> = {}): StartAgentRequest => ({
    kind: 'computer',
    goal: 'do it',
    previewUrl: (id, port) => `http://x/v1/machines/${id}/web/${port}/`,
    ...over,
  });
  const drain = async (h: AgentHandle) => {
    const evs: AgentEvent[] = [];
    for await (const e of h.events) evs.push(e);
    return evs;
  };

  it('refuses bad requests with INVALID_ARGUMENT', async () => {
    const { act } = fakeActions();
    const agents = new AgentActions(settings, () => act);
    for (const bad of [
      req({ goal: '' }),
      req({ goal: ' \n' }),
      req({ goal: 'x'.repeat(4097) }),
      req({ goal: 'a\u0000b' }),
      req({ goal: 'clear \u001b[2J' }),
      req({ maxSteps: 0 }),
      req({ maxSteps: 21 }),
      req({ maxSteps: 2.5 }),
      req({ toolVersion: 'computer_1999' }),
      req({ kind: 'shell', toolVersion: 'computer_20250124' }),
      req({ model: 'm'.repeat(201) }),
    ])
      await assert.rejects(agents.startAgent(principal, 'm1', bad), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(agents.startAgent(principal, 'nope', req()), { code: 'MACHINE_NOT_FOUND' });
    assert.equal(agents.running(), 0);
  });

  it('one run per machine: a second is AGENT_BUSY until the first is done', async () => {
    const { act, calls } = fakeActions({ model: [computer({ action: 'screenshot' }), endTurn()] });
    const agents = new AgentActions(settings, () => act);
    const h = await agents.startAgent(principal, 'named', req());
    assert.equal(h.id, 'm1');
    await assert.rejects(agents.startAgent(principal, 'm1', req()), { code: 'AGENT_BUSY' });
    const evs = await drain(h);
    assert.equal((evs.at(-1) as { outcome: string }).outcome, 'completed');
    assert.deepEqual(calls.beta[0], ['computer-use-2025-01-24']);
    assert.equal((evs[0] as { model: string }).model, 'claude-default');
    // The session is released once; the machine is free again.
    await new Promise((r) => setImmediate(r));
    assert.deepEqual([calls.sessions, calls.released], [1, 1]);
    assert.equal(agents.running(), 0);
    const again = await agents.startAgent(principal, 'm1', req({ kind: 'shell' }));
    again.cancel();
    assert.equal(agents.running(), 0);
  });

  it('NO_DISPLAY is an error before any run (and frees the machine)', async () => {
    const { act } = fakeActions({ display: false });
    const agents = new AgentActions(settings, () => act);
    await assert.rejects(agents.startAgent(principal, 'm1', req()), { code: 'NO_DISPLAY' });
    assert.equal(agents.running(), 0);
  });

  it('a handle cancelled before it runs never calls the model and releases its session', async () => {
    const { act, calls } = fakeActions();
    const agents = new AgentActions(settings, () => act);
    const h = await agents.startAgent(principal, 'm1', req());
    h.cancel();
    h.cancel();
    assert.deepEqual([calls.sessions, calls.released, calls.beta.length], [1, 1, 0]);
    assert.equal(agents.running(), 0);
  });

  it('a run cancelled mid-model-call ends and frees the machine', async () => {
    const { act, calls } = fakeActions({
      model: [
        (_r, signal) =>
          new Promise((_res, reject) => signal.addEventListener('abort', () => reject(new Error('aborted')))),
      ],
    });
    const agents = new AgentActions(settings, () => act);
    const h = await agents.startAgent(principal, 'm1', req({ kind: 'shell' }));
    const p = drain(h);
    await new Promise((r) => setTimeout(r, 10));
    h.cancel();
    const evs = await p;
    assert.equal((evs.at(-1) as { outcome: string }).outcome, 'stopped');
    await new Promise((r) => setImmediate(r));
    assert.equal(agents.running(), 0);
    assert.equal(calls.released, 1);
  });
});
