import { randomBytes } from 'node:crypto';
import type { Log } from '../background.js';
import type { Actions } from '../core/dispatch.js';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';
import type { AgentEvent } from './agent-events.js';
import { hostOf } from './agent-host.js';
import { type AgentKind, AgentRun } from './agent-loop.js';
import { type ComputerToolVersion, fitScale, isComputerToolVersion } from './computer-tool.js';
import { shellToolVersion } from './shell-tools.js';

/** The agents' part of the configuration (config.ts: HUTCH_AGENT_*). */
export interface AgentSettings {
  agentModel: string;
  agentToolVersion: ComputerToolVersion;
  /** The most steps (model turns) a client may ask for. */
  agentMaxSteps: number;
  agentTimeLimitMs: number;
  /** Pause after input before the screenshot that shows its effect. */
  agentSettleMs: number;
}

export interface StartAgentRequest {
  kind: AgentKind;
  goal: string;
  model?: string | undefined;
  toolVersion?: string | undefined;
  maxSteps?: number | undefined;
  inlineScreenshots?: boolean | undefined;
  /** Where a client reaches port `port` of machine `id` (depends on how it reached the API). */
  previewUrl: (id: string, port: number) => string;
}

/** A started run: iterate `events` to run it (it ends with `done`), `stop` or `cancel` it. */
export interface AgentHandle {
  /** The machine's id. */
  id: string;
  events: AsyncIterable<AgentEvent>;
  /** Finish the current action, then done(stopped). */
  stop(): void;
  /** Abandon everything in flight (the client went away). Before `events` is iterated: frees the machine. */
  cancel(): void;
}

/**
 * Whether a goal is text a person would write: no control characters but tab and line breaks
 * (a NUL or an escape sequence in a goal is an attack on whatever displays it, not a task).
 */
export function goalProblem(goal: string): string | undefined {
  if (goal.trim() === '') return 'required, not blank';
  if (Buffer.byteLength(goal) > maxGoalBytes) return `longer than ${maxGoalBytes} bytes`;
  for (let i = 0; i < goal.length; i++) {
    const c = goal.charCodeAt(i);
    if ((c < 0x20 && c !== 0x09 && c !== 0x0a && c !== 0x0d) || c === 0x7f)
      return 'control characters are not allowed (tab and line breaks are)';
  }
  return undefined;
}

/** The longest goal, in bytes. */
export const maxGoalBytes = 4096;
export const defaultMaxSteps = 50;
/** A handle whose events nobody reads for this long is cancelled (a client that never upgraded). */
const unstartedMs = 30_000;

/**
 * Serves `startAgent`: one run per machine at a time (a second is AGENT_BUSY: two agents on
 * one screen would fight over the pointer). A run acts as the principal that started it, through
 * that principal's actions: it reaches exactly what its owner reaches, and its model calls are
 * that owner's usage.
 */
export class AgentActions {
  private readonly busy = new Set<string>();

  constructor(
    private readonly settings: AgentSettings,
    private readonly actionsOf: (p: Principal) => Actions,
    private readonly log: Log = () => {},
  ) {}

  /** Machines with a run in progress (for tests and health). */
  running(): number {
    return this.busy.size;
  }

  async startAgent(p: Principal, idOrName: string, req: StartAgentRequest): Promise<AgentHandle> {
    const s = this.settings;
    const problem = typeof req.goal === 'string' ? goalProblem(req.goal) : 'required';
    if (problem) throw new HutchError('INVALID_ARGUMENT', `goal: ${problem}`);
    const maxSteps = req.maxSteps ?? Math.min(defaultMaxSteps, s.agentMaxSteps);
    if (!Number.isInteger(maxSteps) || maxSteps < 1 || maxSteps > s.agentMaxSteps)
      throw new HutchError('INVALID_ARGUMENT', `max_steps: 1..${s.agentMaxSteps}`);
    const toolVersion =
      req.kind === 'computer'
        ? (req.toolVersion ?? s.agentToolVersion)
        : (req.toolVersion ?? shellToolVersion);
    if (req.kind === 'computer' ? !isComputerToolVersion(toolVersion) : toolVersion !== shellToolVersion)
      throw new HutchError('INVALID_ARGUMENT', `tool_version: ${JSON.stringify(toolVersion)} is not served`);
    const model = req.model ?? s.agentModel;
    if (model === '' || model.length > 200)
      throw new HutchError('INVALID_ARGUMENT', 'model: 1..200 characters');

    const act = this.actionsOf(p);
    const id = act.get(idOrName).id;
    if (this.busy.has(id))
      throw new HutchError('AGENT_BUSY', `machine ${id} already has an agent running; stop it first`);
    // Taken before the first await: two requests at once cannot both pass the check.
    this.busy.add(id);
    let release = (): void => {
      release = () => {};
      this.busy.delete(id);
    };
    try {
      // Before the client is answered: NO_DISPLAY (or a stopped machine) is an HTTP error, not an event.
      let geometry: { width: number; height: number; screen: { width: number; height: number } } | undefined;
      let portsBefore: number[] | undefined;
      if (req.kind === 'computer') {
        const shot = await act.screenshot(id, {});
        const scale = fitScale(shot.screen);
        geometry = {
          width: Math.round(shot.screen.width * scale),
          height: Math.round(shot.screen.height * scale),
          screen: { ...shot.screen },
        };
      } else {
        portsBefore = await act.listeningPorts(id);
      }
      const ops = await act.openSession(id);
      const host = hostOf(act, id, ops, (port) => req.previewUrl(id, port));
      const run = new AgentRun(host, {
        kind: req.kind,
        goal: req.goal,
        model,
        toolVersion,
        maxSteps,
        timeLimitMs: s.agentTimeLimitMs,
        runId: `${id}-${randomBytes(6).toString('hex')}`,
        inlineScreenshots: req.inlineScreenshots === true,
        settleMs: s.agentSettleMs,
        ...(geometry ? { geometry } : {}),
        ...(portsBefore ? { portsBefore } : {}),
      });
      let started = false;
      const abandon = (): void => {
        if (started) return;
        started = true;
        host.close();
        release();
      };
      const timer = setTimeout(abandon, unstartedMs);
      timer.unref();
      return {
        id,
        events: {
          [Symbol.asyncIterator]: () => {
            if (started) return run.events[Symbol.asyncIterator]();
            started = true;
            clearTimeout(timer);
            const t0 = performance.now();
            void run
              .run()
              .then((d) =>
                // One line per run: what it cost and how it ended (the audit line says who started it).
                this.log('info', 'agent run', {
                  user: p.user,
                  machine: id,
                  kind: req.kind,
                  model,
                  outcome: d.outcome,
                  steps: d.steps,
                  input_tokens: d.usage.input_tokens,
                  output_tokens: d.usage.output_tokens,
                  ms: Math.round(performance.now() - t0),
                }),
              )
              .finally(release);
            return run.events[Symbol.asyncIterator]();
          },
        },
        stop: () => run.stop(),
        cancel: () => {
          clearTimeout(timer);
          abandon();
          run.cancel();
        },
      };
    } catch (e) {
      release();
      throw e;
    }
  }
}
