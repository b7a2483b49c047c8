import { existsSync, readFileSync } from 'node:fs';
import { type AgentConnection, connectAgent } from '../guest/agent-connection.js';
import { isAlive, runPaths } from './qemu.js';

/**
 * Connects to the agent of a QEMU that is booting, failing as soon as that QEMU exits (with
 * the last lines of its log) rather than at the timeout: a machine that cannot boot says so
 * in milliseconds. `context` adds what the caller knows (the console's last words).
 */
export async function connectWhileAlive(
  pid: number,
  runDir: string,
  timeoutMs: number,
  context: () => string = () => '',
): Promise<AgentConnection> {
  const abort = new AbortController();
  const exitReport = (): string => {
    const path = runPaths(runDir).qemuLog;
    const log = existsSync(path) ? readFileSync(path, 'utf8').trim().split('\n').slice(-3).join(' | ') : '';
    return `qemu exited during boot${log ? ` (${log})` : ''}`;
  };
  const died = new Promise<never>((_, reject) => {
    const t = setInterval(() => {
      if (abort.signal.aborted) return clearInterval(t);
      if (!isAlive(pid)) {
        clearInterval(t);
        const more = context();
        reject(new Error(`${exitReport()}${more ? `; ${more}` : ''}`));
      }
    }, 25);
  });
  try {
    return await Promise.race([
      connectAgent(runPaths(runDir).agent, { timeoutMs, signal: abort.signal }),
      died,
    ]);
  } catch (e) {
    // A dead QEMU also breaks the agent socket; the exit is the more useful report.
    await new Promise((r) => setTimeout(r, 30));
    if (!isAlive(pid)) throw new Error(exitReport());
    throw e;
  } finally {
    abort.abort();
    died.catch(() => {});
  }
}
