import { HutchError } from '../errors.js';
import type { AgentHost } from './agent-host.js';
import { ToolInputError } from './computer-tool.js';

/**
 * The shell agent's tools, Anthropic's `bash_20250124` and `text_editor_20250728`
 * (`str_replace_based_edit_tool`), run in the machine through the host: commands through exec
 * (each a fresh bash whose working directory and exported variables are carried over from the
 * last, which is what the model expects of "a session"), files through the guest's file ops.
 */

export const shellToolVersion = 'bash_20250124';
export const shellBeta: string[] = [];

/** Output the model gets of one command or one view: beyond this, the middle is cut with a note. */
export const maxToolOutput = 16 * 1024;
/** The largest file the editor reads or writes. */
export const maxEditorFile = 1024 * 1024;

export interface ToolOutcome {
  ok: boolean;
  output: string;
}

/** Cuts the middle of a long text, saying how much went. */
export function truncateMiddle(text: string, max = maxToolOutput): string {
  if (text.length <= max) return text;
  const half = Math.floor(max / 2);
  return `${text.slice(0, half)}\n[… ${text.length - 2 * half} characters omitted …]\n${text.slice(-half)}`;
}

function obj(input: unknown): Record<string, unknown> {
  if (input === null || typeof input !== 'object' || Array.isArray(input))
    throw new ToolInputError('the input must be an object');
  return input as Record<string, unknown>;
}

function path(o: Record<string, unknown>): string {
  const p = o.path;
  if (typeof p !== 'string' || !p.startsWith('/') || p.includes('\0') || p.length > 4096)
    throw new ToolInputError('path must be an absolute path');
  return p;
}

function text(o: Record<string, unknown>, field: string, allowEmpty = true): string {
  const v = o[field];
  if (typeof v !== 'string' || (!allowEmpty && v === ''))
    throw new ToolInputError(`${field} must be a string`);
  if (Buffer.byteLength(v) > maxEditorFile)
    throw new ToolInputError(`${field} is larger than ${maxEditorFile} bytes`);
  return v;
}

/**
 * The bash tool of one run. State lives in two files of the guest's /tmp named after the run
 * (`.cwd`, `.env`): `restart` removes them, so the next command starts in /root with the
 * machine's environment.
 */
export class BashTool {
  private readonly stateDir: string;

  constructor(
    private readonly host: AgentHost,
    runId: string,
    private readonly timeoutMs: number,
  ) {
    this.stateDir = `/tmp/.hutch-agent-${runId.replace(/[^A-Za-z0-9_-]/g, '')}`;
  }

  /** `signal` (a stop) kills the command; the model is told. */
  async run(input: unknown, signal?: AbortSignal): Promise<ToolOutcome> {
    const o = obj(input);
    if (o.restart === true) {
      await this.host.exec(`rm -f '${this.stateDir}.env' '${this.stateDir}.cwd'`, { timeoutMs: 10_000 });
      return { ok: true, output: 'tool has been restarted.' };
    }
    const command = o.command;
    if (typeof command !== 'string' || command.trim() === '')
      throw new ToolInputError('command must be a non-empty string (or restart: true)');
    if (command.length > 64 * 1024) throw new ToolInputError('command is longer than 64 KiB');
    if (signal?.aborted)
      return { ok: false, output: '[stopped: the run was stopped before the command ran.]' };
    const r = await this.host.exec(this.script(), {
      stdin: command,
      timeoutMs: this.timeoutMs,
      ...(signal ? { signal } : {}),
    });
    let out = r.stdout;
    if (r.stderr) out += (out && !out.endsWith('\n') ? '\n' : '') + r.stderr;
    out = truncateMiddle(out);
    if (r.truncated) out += '\n[output truncated by the server]';
    if (signal?.aborted && !r.timedOut)
      return {
        ok: false,
        output: `${out}${out === '' || out.endsWith('\n') ? '' : '\n'}[stopped: the run was stopped and the command was killed.]`,
      };
    if (r.timedOut)
      return {
        ok: false,
        output: `${out}\n[timed out after ${Math.round(this.timeoutMs / 1000)} s; the command was killed. Run long jobs in the background (nohup … &).]`,
      };
    if (r.exitCode !== 0 && r.exitCode !== null)
      out += `${out === '' || out.endsWith('\n') ? '' : '\n'}[exit code ${r.exitCode}]`;
    return { ok: true, output: out || '(no output)' };
  }

  /**
   * The wrapper each command runs in: the command comes on stdin (no quoting to get wrong), is
   * eval'd in the directory and environment the last one left, which are then saved again.
   * Only bash builtins around the command: under TCG every extra process costs tens of ms (with
   * mkdir, cat and a $(…) a step took ~9x a bare exec). The command's own stdin is at its end,
   * so nothing waits on a terminal that is not there.
   */
  private script(): string {
    const s = this.stateDir;
    return [
      `[ -f '${s}.env' ] && . '${s}.env' >/dev/null 2>&1`,
      `__hutch_dir=/root; [ -f '${s}.cwd' ] && IFS= read -r __hutch_dir < '${s}.cwd'`,
      'cd "$__hutch_dir" 2>/dev/null || cd /',
      "IFS= read -r -d '' __hutch_cmd",
      'unset __hutch_dir',
      'eval "$__hutch_cmd"',
      '__hutch_rc=$?',
      `pwd > '${s}.cwd' 2>/dev/null`,
      `export -p > '${s}.env' 2>/dev/null`,
      'exit $__hutch_rc',
    ].join('\n');
  }
}

/** Lines numbered as `cat -n` does, from `first`. */
function numbered(lines: string[], first: number): string {
  return lines.map((l, i) => `${String(first + i).padStart(6)}\t${l}`).join('\n');
}

/** The text editor tool: view, create, str_replace, insert (the 20250728 version has no undo). */
export class EditorTool {
  constructor(private readonly host: AgentHost) {}

  async run(input: unknown): Promise<ToolOutcome> {
    const o = obj(input);
    const p = path(o);
    switch (o.command) {
      case 'view':
        return this.view(p, o);
      case 'create': {
        await this.host.writeFile(p, Buffer.from(text(o, 'file_text')));
        return { ok: true, output: `File created successfully at: ${p}` };
      }
      case 'str_replace': {
        const old = text(o, 'old_str', false);
        const repl = o.new_str === undefined ? '' : text(o, 'new_str');
        const content = await this.read(p);
        const first = content.indexOf(old);
        if (first < 0)
          return { ok: false, output: `No replacement was performed: old_str was not found in ${p}.` };
        const second = content.indexOf(old, first + 1);
        if (second >= 0) {
          const lineOf = (i: number): number => content.slice(0, i).split('\n').length;
          return {
            ok: false,
            output: `No replacement was performed: old_str occurs more than once in ${p} (lines ${lineOf(first)} and ${lineOf(second)}); include more context to make it unique.`,
          };
        }
        const next = content.slice(0, first) + repl + content.slice(first + old.length);
        await this.host.writeFile(p, Buffer.from(next));
        const startLine = content.slice(0, first).split('\n').length;
        const lines = next.split('\n');
        const from = Math.max(1, startLine - 4);
        const to = Math.min(lines.length, startLine + repl.split('\n').length + 3);
        return {
          ok: true,
          output: `The file ${p} has been edited. A snippet of it:\n${numbered(lines.slice(from - 1, to), from)}`,
        };
      }
      case 'insert': {
        const line = o.insert_line;
        // insert_text is the 20250728 name; older versions sent new_str.
        const ins = o.insert_text !== undefined ? text(o, 'insert_text') : text(o, 'new_str');
        const content = await this.read(p);
        const lines = content.split('\n');
        if (typeof line !== 'number' || !Number.isInteger(line) || line < 0 || line > lines.length)
          throw new ToolInputError(`insert_line must be an integer, 0..${lines.length}`);
        lines.splice(line, 0, ...ins.split('\n'));
        await this.host.writeFile(p, Buffer.from(lines.join('\n')));
        return { ok: true, output: `The file ${p} has been edited (inserted after line ${line}).` };
      }
      default:
        throw new ToolInputError(
          `unknown command ${JSON.stringify(o.command)?.slice(0, 80)} (view, create, str_replace, insert)`,
        );
    }
  }

  private async read(p: string): Promise<string> {
    return (await this.host.readFile(p, maxEditorFile)).toString('utf8');
  }

  private async view(p: string, o: Record<string, unknown>): Promise<ToolOutcome> {
    let content: string;
    try {
      content = await this.read(p);
    } catch (e) {
      // A directory: list it the way the reference tool does (two levels, no hidden files).
      if (e instanceof HutchError && (e.code === 'NOT_A_FILE' || e.details?.errno === 'EISDIR')) {
        const r = await this.host.exec(`find "$1" -maxdepth 2 -not -path '*/.*' | head -500`, {
          stdin: '',
          timeoutMs: 10_000,
          args: [p],
        });
        return { ok: true, output: truncateMiddle(r.stdout) };
      }
      throw e;
    }
    const lines = content.split('\n');
    let from = 1;
    let to = lines.length;
    const range = o.view_range;
    if (range !== undefined && range !== null) {
      if (
        !Array.isArray(range) ||
        range.length !== 2 ||
        !range.every((n) => typeof n === 'number' && Number.isInteger(n))
      )
        throw new ToolInputError('view_range must be [start, end] (end -1: to the end)');
      const [a, b] = range as [number, number];
      if (a < 1 || a > lines.length || (b !== -1 && (b < a || b > lines.length)))
        throw new ToolInputError(`view_range [${a}, ${b}] is outside the file's ${lines.length} lines`);
      from = a;
      to = b === -1 ? lines.length : b;
    }
    const max =
      typeof o.max_characters === 'number' && o.max_characters > 0 ? o.max_characters : maxToolOutput;
    return { ok: true, output: truncateMiddle(numbered(lines.slice(from - 1, to), from), max) };
  }
}
