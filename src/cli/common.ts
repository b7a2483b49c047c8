import { once } from 'node:events';
import { type ParseArgsConfig, parseArgs } from 'node:util';
import type { RawData, WebSocket } from 'ws';

/** Helpers every CLI command shares: errors, JSON output, and the interactive terminal. */

export type Flags = Record<string, string | boolean | string[] | undefined>;

/**
 * Splits `args` at `--` (what follows is the guest's argv) and parses the flags before it;
 * a bad flag fails with the usage text.
 */
export function parseCommand(
  args: string[],
  options: ParseArgsConfig['options'],
  usage: string,
): { flags: Flags; positionals: string[]; trailing: string[] } {
  const dashdash = args.indexOf('--');
  const own = dashdash >= 0 ? args.slice(0, dashdash) : args;
  const trailing = dashdash >= 0 ? args.slice(dashdash + 1) : [];
  try {
    const parsed = parseArgs({ args: own, allowPositionals: true, options }) as {
      values: Flags;
      positionals: string[];
    };
    return { flags: parsed.values, positionals: parsed.positionals, trailing };
  } catch (e) {
    fail(`${(e as Error).message}\n\n${usage}`);
  }
}

let jsonErrors = false;

/**
 * With `--json` a caller parses stdout, so every failure, a usage error included, is one JSON
 * document there too (`{"code","message"}`), with the same non-zero exit code.
 */
export function setJsonErrors(on: boolean): void {
  jsonErrors = on;
}

/** Whether `--json` appears among the CLI's own arguments (before `--`). */
export function wantsJson(argv: readonly string[]): boolean {
  const dashdash = argv.indexOf('--');
  return (dashdash >= 0 ? argv.slice(0, dashdash) : argv).includes('--json');
}

/** Exit code 2 is a usage error (code USAGE); anything else a failure of the CLI itself. */
export function fail(msg: string, code = 2, errorCode = code === 2 ? 'USAGE' : 'CLI_ERROR'): never {
  // The usage text that follows a usage error is for people: the document keeps the reason.
  if (jsonErrors) printJson({ code: errorCode, message: msg.split('\n\n')[0] });
  process.stderr.write(`hutch: ${msg}\n`);
  process.exit(code);
}

export function printJson(v: unknown): void {
  process.stdout.write(`${JSON.stringify(v, null, 2)}\n`);
}

/** Writes to stdout/stderr, waiting when the pipe is full (output is never dropped or reordered). */
export async function writeOut(dest: NodeJS.WriteStream, data: Buffer | string): Promise<void> {
  if (!dest.write(data)) await once(dest, 'drain');
}

/** `--env K=V` flags as an object (undefined when there are none). */
export function envFlags(list: string[] | undefined): Record<string, string> | undefined {
  if (!list?.length) return undefined;
  const env: Record<string, string> = {};
  for (const kv of list) {
    const i = kv.indexOf('=');
    if (i <= 0) fail(`--env wants KEY=VALUE, got ${JSON.stringify(kv)}`);
    env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return env;
}

/** What an attach asks for: the local terminal's size and type. */
export interface TerminalSize {
  cols: number;
  rows: number;
  term: string;
}

/**
 * An interactive shell on a PTY (machines' `hutch attach` and `hutch box attach`): opens the
 * WebSocket with the local terminal's size, then runs it as a terminal whose size follows the
 * local one. Resolves with the shell's exit code.
 */
export async function attachTerminal(
  open: (size: TerminalSize) => Promise<WebSocket>,
  term: string | undefined,
): Promise<number> {
  const ws = await open({
    cols: process.stdout.columns ?? 80,
    rows: process.stdout.rows ?? 24,
    term: term ?? 'xterm-256color',
  });
  return terminal(ws, { resize: true });
}

/**
 * Connects the local terminal to a channel: raw mode, keys to the socket, binary frames to
 * stdout; with `resize`, the window size follows SIGWINCH. Resolves with the exit code.
 */
export function terminal(ws: WebSocket, opts: { resize: boolean; escape?: number }): Promise<number> {
  return new Promise((resolve) => {
    const stdin = process.stdin;
    const raw = stdin.isTTY === true;
    if (raw) stdin.setRawMode(true);
    let exitCode: number | undefined;
    const onKeys = (b: Buffer): void => {
      if (opts.escape !== undefined && b.includes(opts.escape)) {
        ws.close(1000, 'detached');
        return;
      }
      ws.send(b, { binary: true });
    };
    const onResize = (): void => {
      if (!process.stdout.columns || !process.stdout.rows) return;
      ws.send(JSON.stringify({ type: 'resize', cols: process.stdout.columns, rows: process.stdout.rows }));
    };
    stdin.on('data', onKeys);
    stdin.resume();
    // 'resize' follows SIGWINCH once Node has read the new size.
    if (opts.resize) process.stdout.on('resize', onResize);
    ws.on('message', (data: RawData, isBinary: boolean) => {
      const b = Buffer.isBuffer(data)
        ? data
        : Buffer.concat(Array.isArray(data) ? data : [Buffer.from(data)]);
      if (isBinary) {
        if (!process.stdout.write(b)) {
          ws.pause();
          process.stdout.once('drain', () => ws.resume());
        }
        return;
      }
      try {
        const msg = JSON.parse(b.toString('utf8')) as { type?: string; code?: number };
        if (msg.type === 'exit' && typeof msg.code === 'number') exitCode = msg.code;
      } catch {
        // not a control message of ours: ignore
      }
    });
    ws.on('error', () => {
      // 'close' follows and reports
    });
    ws.resume();
    ws.on('close', (code: number, reason: Buffer) => {
      stdin.off('data', onKeys);
      process.stdout.off('resize', onResize);
      if (raw) stdin.setRawMode(false);
      stdin.pause();
      if (exitCode !== undefined) return resolve(exitCode);
      const why = reason.toString('utf8');
      if (code === 1000 && (why === 'detached' || why === '')) return resolve(0);
      process.stderr.write(`\r\nhutch: connection closed (${code}${why ? `: ${why}` : ''})\r\n`);
      resolve(1);
    });
  });
}
