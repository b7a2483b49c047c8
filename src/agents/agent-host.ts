import type { Actions } from '../core/dispatch.js';
import type { InputAction, InputResult, Screenshot, ScreenshotOptions } from '../desktop/input-types.js';
import { HutchError } from '../errors.js';
import type { GuestOps } from '../guest/guest-ops.js';
import type { AnthropicMessagesRequest, AnthropicMessagesResponse } from './model-types.js';

/**
 * Everything an agent run does to the world, in one small interface: the loop (agent-loop.ts)
 * is written against it alone, so tests drive it with a fake and the real one (hostOf below)
 * can only reach what its principal's actions reach.
 */
export interface AgentHost {
  model(
    req: AnthropicMessagesRequest,
    opts: { signal: AbortSignal; beta: string[] },
  ): Promise<AnthropicMessagesResponse>;
  screenshot(opts: ScreenshotOptions): Promise<Screenshot>;
  input(actions: InputAction[]): Promise<InputResult>;
  /** Runs a bash script (`$1`… are `args`) with `stdin`, to completion or the timeout. */
  exec(
    script: string,
    opts: { stdin?: string; args?: string[]; timeoutMs: number; signal?: AbortSignal },
  ): Promise<ShellResult>;
  /** A file's bytes, at most `maxBytes` (FILE_TOO_BIG past that, so the model is told). */
  readFile(path: string, maxBytes: number): Promise<Buffer>;
  writeFile(path: string, data: Buffer): Promise<void>;
  listeningPorts(): Promise<number[]>;
  /** Where a client reaches a server listening on `port` in the machine (docs/previews.md). */
  previewUrl(port: number): string;
  /** Ends what the host holds (the machine's session); once, when the run is over. */
  close(): void;
}

export interface ShellResult {
  exitCode: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  truncated: boolean;
}

/**
 * The real host of a run on machine `id`, as the principal whose `act` this is: its model calls
 * go through the gateway (so their usage is that user's), its screen and files are that user's
 * machine. `ops` is a session opened for the run: while it is open the machine never counts as
 * idle (an agent thinking for a minute must not see its machine suspended under it).
 */
export function hostOf(
  act: Actions,
  id: string,
  ops: GuestOps,
  previewUrl: (port: number) => string,
): AgentHost {
  let closed = false;
  return {
    async model(req, opts) {
      const r = await act.anthropicMessages(req, { signal: opts.signal, beta: opts.beta });
      // What a turn can hold for the loop: text and tool uses (other kinds, e.g. thinking, are skipped).
      return { ...r, content: r.content.filter((b) => b.type === 'text' || b.type === 'tool_use') };
    },
    screenshot: (opts) => act.screenshot(id, opts),
    input: (actions) => act.input(id, actions),
    async exec(script, opts) {
      const r = await act.exec(id, {
        argv: ['/bin/bash', '-c', script, 'bash', ...(opts.args ?? [])],
        stdin: opts.stdin ?? '',
        timeoutMs: opts.timeoutMs,
        ...(opts.signal ? { signal: opts.signal } : {}),
      });
      try {
        return {
          exitCode: r.exit_code,
          stdout: r.stdout.toJSON(),
          stderr: r.stderr.toJSON(),
          timedOut: r.timed_out,
          truncated: r.truncated,
        };
      } finally {
        // Buffered output is held against the daemon's exec budget until given back.
        r.stdout.release();
        r.stderr.release();
      }
    },
    async readFile(path, maxBytes) {
      const f = await ops.readFile(path);
      const parts: Buffer[] = [];
      let n = 0;
      try {
        for await (const c of f.chunks()) {
          n += c.length;
          if (n > maxBytes)
            throw new HutchError('LIMIT_EXCEEDED', `${path} is larger than ${maxBytes} bytes`);
          parts.push(c);
        }
      } finally {
        f.close();
      }
      return Buffer.concat(parts);
    },
    async writeFile(path, data) {
      await ops.writeFile(path, data, { mode: 0o644, mkdirs: true });
    },
    listeningPorts: () => act.listeningPorts(id),
    previewUrl,
    close() {
      if (closed) return;
      closed = true;
      ops.release();
    },
  };
}
