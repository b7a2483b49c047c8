import type { Principal } from '../../core/principal.js';
import { execEnv, execError } from '../box-execs.js';
import { boxSpecOf } from '../box-view.js';
import { HeldText, type OutputBudget } from '../output-budget.js';
import type { FlowContext } from './context.js';
import { type CreateBox, createBox } from './create.js';

export interface RunResult {
  exit_code: number | null;
  stdout: HeldText;
  stderr: HeldText;
  error_message: string | null;
  /** As an exec's: completed, timed_out or failed (could not start); with the killing signal. */
  status: 'completed' | 'timed_out' | 'failed';
  signal: number | null;
}

/** Ephemeral run: a box for one command, removed afterwards whatever happened. */
export async function runOnce(
  cx: FlowContext,
  p: Principal,
  req: CreateBox & { cmd: string[]; timeoutMs?: number },
  execOutput: OutputBudget,
): Promise<RunResult> {
  const { rt, config } = cx;
  // Its command is run here, not as the box's boot `cmd`.
  const { cmd, timeoutMs, ...create } = req;
  const box = await createBox(cx, p, { ...create, name: undefined });
  const m = rt.machine(box);
  try {
    const agent = rt.agentOf(box);
    const spec = boxSpecOf(box);
    try {
      const r = await agent.execBuffered(
        {
          argv: cmd,
          env: execEnv(spec, undefined),
          cwd: spec.workdir,
          ...(timeoutMs ? { timeoutMs } : {}),
        },
        { maxOutputBytes: config.execMaxOutputBytes, allowance: execOutput },
      );
      return {
        exit_code: r.exitCode,
        stdout: new HeldText(r.stdout, execOutput),
        stderr: new HeldText(r.stderr, execOutput),
        status: r.timedOut ? 'timed_out' : 'completed',
        signal: r.signal,
        error_message: r.timedOut
          ? `killed after its timeout of ${timeoutMs} ms`
          : r.signal !== null
            ? `killed by signal ${r.signal}`
            : r.truncated
              ? `output was cut: over ${config.execMaxOutputBytes} bytes, or the server's buffer for all runs at once (${config.execBufferBytes} bytes) was full`
              : null,
      };
    } catch (e) {
      const err = execError(cmd, e);
      return {
        exit_code: null,
        stdout: new HeldText(),
        stderr: new HeldText(),
        error_message: err.message,
        status: 'failed',
        signal: null,
      };
    }
  } finally {
    await m.lock.run(() => rt.end(m, 'deleted'));
  }
}
