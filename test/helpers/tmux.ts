import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { sleep, until, waitFor } from './daemon.js';

/**
 * A real terminal for CLI tests: a tmux server on a socket in the test's own directory (so
 * nothing of it outlives the test), one session `t` running `command`.
 */
export class TmuxSession {
  private readonly sock: string;

  constructor(dir: string) {
    this.sock = join(dir, 'tmux.sock');
  }

  private tmux(...args: string[]): string {
    return execFileSync('tmux', ['-S', this.sock, ...args], { encoding: 'utf8' });
  }

  start(command: string, cols: number, rows: number): void {
    this.tmux('new-session', '-d', '-s', 't', '-x', String(cols), '-y', String(rows), command);
  }

  keys(...keys: string[]): void {
    this.tmux('send-keys', '-t', 't', ...keys);
  }

  screen(): string {
    return this.tmux('capture-pane', '-p', '-t', 't', '-S', '-200');
  }

  resize(cols: number, rows: number): void {
    this.tmux('resize-window', '-t', 't', '-x', String(cols), '-y', String(rows));
  }

  kill(): void {
    spawnSync('tmux', ['-S', this.sock, 'kill-server']);
  }
}

/**
 * What every attach CLI must do in a real terminal started at 100 columns: a shell prompt,
 * `tput cols` that follows a window resize, and Ctrl-C that really ends the foreground
 * program. `running(name)` lists the guest's processes of that name (pgrep -x).
 */
export async function checkTerminal(
  t: TmuxSession,
  running: (name: string) => Promise<string>,
): Promise<void> {
  await until('a shell prompt', () => /[#$] *$/m.test(t.screen()), 60_000);
  t.keys('tput cols', 'Enter');
  await until('tput cols = 100', () => /^100\s*$/m.test(t.screen()));

  t.resize(120, 30);
  await waitFor(
    'tput cols = 120 after the resize',
    async () => {
      t.keys('tput cols', 'Enter');
      await sleep(1000);
      return /^120\s*$/m.test(t.screen()) ? true : undefined;
    },
    30_000,
  );

  t.keys('sleep 100', 'Enter');
  await waitFor('sleep 100 to run', async () => ((await running('sleep')) ? true : undefined), 30_000);
  t.keys('C-c');
  t.keys('echo after-$((40+2))', 'Enter');
  await until('the shell back after Ctrl-C', () => /^after-42\s*$/m.test(t.screen()), 30_000);
  assert.equal(await running('sleep'), '', 'sleep 100 was interrupted');
}
