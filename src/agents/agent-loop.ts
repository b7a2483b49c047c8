import { setTimeout as sleep } from 'node:timers/promises';
import type { Screenshot } from '../desktop/input-types.js';
import { HutchError } from '../errors.js';
import { type AgentEvent, type AgentOutcome, EventQueue, type Usage } from './agent-events.js';
import type { AgentHost } from './agent-host.js';
import {
  type ComputerToolVersion,
  computerToolVersions,
  planComputerAction,
  type ScreenGeometry,
  ToolInputError,
  toModel,
} from './computer-tool.js';
import type {
  AgentTool,
  AnthropicMessagesRequest,
  ContentBlock,
  ImageBlock,
  MessageParam,
  TextBlock,
  ToolResultBlock,
  ToolUseBlock,
} from './model-types.js';
import { BashTool, EditorTool, type ToolOutcome, truncateMiddle } from './shell-tools.js';

/**
 * The agent loop: ask the model, run each tool use it asks for, answer with one user message of
 * tool results, again, until the model stops asking, a limit is reached or the client stops.
 * Everything it touches goes through an AgentHost, and everything it says goes out as events.
 */

export type AgentKind = 'computer' | 'shell';

export interface AgentRunConfig {
  kind: AgentKind;
  goal: string;
  model: string;
  /** computer_20250124 / computer_20251124 for the computer agent; bash_20250124 for the shell agent. */
  toolVersion: string;
  /** Model turns at most. */
  maxSteps: number;
  timeLimitMs: number;
  /** Names the run's state in the guest (the bash tool's directory). */
  runId: string;
  maxTokens?: number;
  /** Screenshot events carry the PNG (base64); else only its size. */
  inlineScreenshots?: boolean;
  /** Pause between an input action and the screenshot after it, for the screen to redraw. */
  settleMs?: number;
  bashTimeoutMs?: number;
  /** The computer agent: the screen as a first screenshot found it (see AgentActions). */
  geometry?: ScreenGeometry;
  /** The shell agent: ports listening before the run, to tell which servers it started. */
  portsBefore?: number[];
  /** Screenshots kept in the conversation: older ones are replaced by a note (requests stay small). */
  keepImages?: number;
}

/** Errors after which the machine cannot be worked on: the run ends instead of telling the model. */
const fatalCodes = new Set([
  'MACHINE_NOT_FOUND',
  'MACHINE_NOT_RUNNING',
  'AGENT_UNAVAILABLE',
  'NO_DISPLAY',
  'NOT_SERVED',
]);

/** Most bytes of an action's input echoed in its event (a model may send megabytes). */
const maxEventInput = 8 * 1024;
/** Most characters of a tool's output echoed in a result event. */
const maxEventOutput = 4 * 1024;

function systemPrompt(cfg: AgentRunConfig): string {
  if (cfg.kind === 'computer') {
    const g = cfg.geometry;
    return [
      'You are operating a Linux desktop (X11 with a window manager, an xterm and a web browser) in a',
      `virtual machine through the computer tool. The screen is shown to you at ${g?.width}x${g?.height}.`,
      'Take a screenshot first if you are unsure of the state of the screen. Key names are xdotool names',
      '(Return, ctrl+s). When the goal is reached, say so in one short sentence and stop using tools.',
    ].join(' ');
  }
  return [
    'You are working as root in a Linux virtual machine through the bash and the text editor tools.',
    'Commands run in bash; the working directory and exported variables carry over between commands.',
    'Long-running programs (servers) must be started in the background, e.g. `nohup cmd >/tmp/log 2>&1 &`,',
    'or the command times out. A server listening on a TCP port gets a preview URL the user can open.',
    'When the goal is reached, say so in one short sentence and stop using tools.',
  ].join(' ');
}

function clip(input: unknown): unknown {
  const json = JSON.stringify(input) ?? 'null';
  if (json.length <= maxEventInput) return input;
  return { truncated: true, json: `${json.slice(0, maxEventInput)}…` };
}

function errorOf(e: unknown): { code: string; message: string } {
  if (e instanceof HutchError) return { code: e.code, message: e.message };
  return { code: 'INTERNAL', message: e instanceof Error ? e.message : String(e) };
}

export class AgentRun {
  readonly events = new EventQueue<AgentEvent>();
  private readonly usage: Usage = { input_tokens: 0, output_tokens: 0 };
  private steps = 0;
  private stopping = false;
  private timedOut = false;
  /** Aborted when the client goes away (or the run is over): nothing more is worth doing. */
  private readonly cancelled = new AbortController();
  /** The model call in flight: a stop or the time limit abort it; a tool is let finish (but a bash command is killed). */
  private turn: AbortController | undefined;
  /** A `wait` action in progress, cut short by a stop. */
  private waiting: AbortController | undefined;
  /** The bash command in flight: a stop, the time limit or the client leaving kill it. */
  private command: AbortController | undefined;
  private geometry: ScreenGeometry | undefined;
  private readonly bash: BashTool;
  private readonly editor: EditorTool;
  private started = false;

  constructor(
    private readonly host: AgentHost,
    private readonly cfg: AgentRunConfig,
  ) {
    this.geometry = cfg.geometry;
    this.bash = new BashTool(host, cfg.runId, cfg.bashTimeoutMs ?? 120_000);
    this.editor = new EditorTool(host);
  }

  /** The client asked to stop: the current action finishes, then done(stopped). */
  stop(): void {
    this.stopping = true;
    this.turn?.abort();
    this.waiting?.abort();
    this.command?.abort();
  }

  /** The client went away: everything in flight is abandoned (done still ends the events). */
  cancel(): void {
    this.stopping = true;
    this.cancelled.abort();
    this.turn?.abort();
    this.waiting?.abort();
    this.command?.abort();
  }

  /** Runs to the end; never rejects. The events end with `done` (also its result); the host is closed. */
  async run(): Promise<AgentEvent & { type: 'done' }> {
    if (this.started) throw new Error('an agent run runs once');
    this.started = true;
    const timer = setTimeout(() => {
      this.timedOut = true;
      this.turn?.abort();
      this.waiting?.abort();
      this.command?.abort();
    }, this.cfg.timeLimitMs);
    let outcome: AgentOutcome = 'error';
    try {
      outcome = await this.loop();
    } catch (e) {
      if (!this.cancelled.signal.aborted) this.events.push({ type: 'error', ...errorOf(e) });
      outcome = this.cancelled.signal.aborted ? 'stopped' : 'error';
    } finally {
      clearTimeout(timer);
    }
    const done: AgentEvent & { type: 'done' } = {
      type: 'done',
      outcome,
      steps: this.steps,
      usage: { ...this.usage },
    };
    if (this.cfg.kind === 'shell' && !this.cancelled.signal.aborted) {
      const urls = await this.previewUrls();
      if (urls.length) done.preview_urls = urls;
    }
    this.host.close();
    this.events.push(done);
    this.events.end();
    return done;
  }

  private async previewUrls(): Promise<string[]> {
    try {
      const before = new Set(this.cfg.portsBefore ?? []);
      const now = await this.host.listeningPorts();
      return now.filter((p) => !before.has(p)).map((p) => this.host.previewUrl(p));
    } catch {
      // The machine went away: nothing is served, and the run's outcome already says why.
      return [];
    }
  }

  private tools(): AgentTool[] {
    if (this.cfg.kind === 'shell')
      return [
        { type: 'bash_20250124', name: 'bash' },
        { type: 'text_editor_20250728', name: 'str_replace_based_edit_tool' },
      ];
    const g = this.geometry as ScreenGeometry;
    return [
      {
        type: this.cfg.toolVersion as ComputerToolVersion,
        name: 'computer',
        display_width_px: g.width,
        display_height_px: g.height,
      },
    ];
  }

  private beta(): string[] {
    if (this.cfg.kind === 'shell') return [];
    return [computerToolVersions[this.cfg.toolVersion as ComputerToolVersion]];
  }

  private async loop(): Promise<AgentOutcome> {
    const { cfg } = this;
    if (cfg.kind === 'computer' && !this.geometry) {
      this.geometry = await this.probe();
    }
    this.events.push({ type: 'start', goal: cfg.goal, model: cfg.model, tool_version: cfg.toolVersion });
    const messages: MessageParam[] = [{ role: 'user', content: cfg.goal }];
    for (;;) {
      if (this.cancelled.signal.aborted || this.stopping) return 'stopped';
      if (this.timedOut) return 'time_limit';
      if (this.steps >= cfg.maxSteps) return 'step_limit';
      this.pruneImages(messages);
      const req: AnthropicMessagesRequest = {
        model: cfg.model,
        max_tokens: cfg.maxTokens ?? 4096,
        system: systemPrompt(cfg),
        messages,
        tools: this.tools(),
      };
      this.turn = new AbortController();
      let resp: Awaited<ReturnType<AgentHost['model']>>;
      try {
        resp = await this.host.model(req, { signal: this.turn.signal, beta: this.beta() });
      } catch (e) {
        if (this.cancelled.signal.aborted || this.stopping) return 'stopped';
        if (this.timedOut) return 'time_limit';
        throw e;
      } finally {
        this.turn = undefined;
      }
      this.steps++;
      const step = this.steps;
      if (!resp || !Array.isArray(resp.content))
        throw new HutchError('UPSTREAM_FAILED', 'the model answered without content blocks');
      this.usage.input_tokens += Number(resp.usage?.input_tokens) || 0;
      this.usage.output_tokens += Number(resp.usage?.output_tokens) || 0;
      const uses: ToolUseBlock[] = [];
      for (const b of resp.content) {
        if (b?.type === 'text' && typeof b.text === 'string' && b.text !== '')
          this.events.push({ type: 'text', text: b.text });
        else if (b?.type === 'tool_use' && typeof b.id === 'string') uses.push(b);
      }
      messages.push({ role: 'assistant', content: resp.content });
      if (resp.stop_reason !== 'tool_use' || uses.length === 0) return 'completed';
      const results: ToolResultBlock[] = [];
      for (const use of uses) {
        // Stopped between two tool uses: the API wants a result for each, but none is sent again.
        if (this.cancelled.signal.aborted) return 'stopped';
        results.push(await this.runTool(step, use));
      }
      messages.push({ role: 'user', content: results });
      if (this.cancelled.signal.aborted || this.stopping) return 'stopped';
    }
  }

  /** The first screenshot: the real screen's size, and the scale that fits it to the model. */
  private async probe(): Promise<ScreenGeometry> {
    const s = await this.host.screenshot({});
    const scale = Math.min(1, 1280 / s.screen.width, 800 / s.screen.height);
    return {
      width: Math.round(s.screen.width * scale),
      height: Math.round(s.screen.height * scale),
      screen: { ...s.screen },
    };
  }

  private async runTool(step: number, use: ToolUseBlock): Promise<ToolResultBlock> {
    this.events.push({ type: 'action', step, name: String(use.name).slice(0, 100), input: clip(use.input) });
    try {
      const content =
        use.name === 'computer' && this.cfg.kind === 'computer'
          ? await this.computer(step, use.input)
          : await this.shell(step, use.name, use.input);
      return { type: 'tool_result', tool_use_id: use.id, content };
    } catch (e) {
      if (e instanceof HutchError && fatalCodes.has(e.code)) throw e;
      const message = e instanceof ToolInputError || e instanceof HutchError ? e.message : String(e);
      this.events.push({ type: 'result', step, ok: false, output: message.slice(0, maxEventOutput) });
      return {
        type: 'tool_result',
        tool_use_id: use.id,
        content: [{ type: 'text', text: `Error: ${message}` }],
        is_error: true,
      };
    }
  }

  private async shell(step: number, name: string, input: unknown): Promise<(TextBlock | ImageBlock)[]> {
    let r: ToolOutcome;
    if (this.cfg.kind === 'shell' && name === 'bash') {
      this.command = new AbortController();
      if (this.stopping || this.timedOut) this.command.abort();
      try {
        r = await this.bash.run(input, this.command.signal);
      } finally {
        this.command = undefined;
      }
    } else if (this.cfg.kind === 'shell' && name === 'str_replace_based_edit_tool')
      r = await this.editor.run(input);
    else throw new ToolInputError(`no tool named ${JSON.stringify(name).slice(0, 100)} here`);
    if (!r.ok) throw new ToolInputError(r.output);
    this.events.push({ type: 'result', step, ok: true, output: truncateMiddle(r.output, maxEventOutput) });
    return [{ type: 'text', text: r.output }];
  }

  private async computer(step: number, input: unknown): Promise<(TextBlock | ImageBlock)[]> {
    const g = this.geometry as ScreenGeometry;
    const plan = planComputerAction(this.cfg.toolVersion as ComputerToolVersion, g, input);
    switch (plan.kind) {
      case 'cursor_position': {
        const r = await this.host.input([]);
        const p = toModel(g, r.cursor);
        const text = `X=${p.x},Y=${p.y}`;
        this.events.push({ type: 'result', step, ok: true, output: text });
        return [{ type: 'text', text }];
      }
      case 'wait':
        await this.pause(plan.ms);
        break;
      case 'input':
        await this.host.input(plan.actions);
        if (this.cfg.settleMs) await this.pause(this.cfg.settleMs);
        break;
      case 'screenshot':
        break;
      case 'zoom': {
        // The region at the screen's own resolution, scaled down only past the width the
        // model's screenshots have.
        const img = this.image(step, await this.host.screenshot({ region: plan.region, maxWidth: g.width }));
        this.events.push({ type: 'result', step, ok: true });
        return [img];
      }
    }
    // By width: the image is exactly as wide as the model was told (a scale could round to one less).
    const shot = await this.host.screenshot(g.width < g.screen.width ? { maxWidth: g.width } : {});
    const img = this.image(step, shot);
    this.events.push({ type: 'result', step, ok: true });
    return [img];
  }

  private image(step: number, shot: Screenshot): ImageBlock {
    const data = shot.png.toString('base64');
    this.events.push({
      type: 'screenshot',
      step,
      width: shot.width,
      height: shot.height,
      ...(this.cfg.inlineScreenshots ? { data } : {}),
    });
    return { type: 'image', source: { type: 'base64', media_type: 'image/png', data } };
  }

  private async pause(ms: number): Promise<void> {
    if (ms <= 0 || this.stopping || this.timedOut) return;
    this.waiting = new AbortController();
    try {
      await sleep(ms, undefined, { signal: this.waiting.signal });
    } catch {
      // Cut short by a stop, the time limit or the client leaving.
    } finally {
      this.waiting = undefined;
    }
  }

  /** Keeps the newest `keepImages` screenshots in the conversation; older ones become a note. */
  private pruneImages(messages: MessageParam[]): void {
    let keep = this.cfg.keepImages ?? 3;
    for (let i = messages.length - 1; i >= 0; i--) {
      const content = messages[i]?.content;
      if (!Array.isArray(content)) continue;
      for (const block of content as ContentBlock[]) {
        if (block.type !== 'tool_result') continue;
        block.content = block.content.map((c) => {
          if (c.type !== 'image') return c;
          if (keep > 0) {
            keep--;
            return c;
          }
          return { type: 'text', text: '[an earlier screenshot, omitted]' };
        });
      }
    }
  }
}
