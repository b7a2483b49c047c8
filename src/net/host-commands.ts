import { spawn } from 'node:child_process';

/**
 * Runs a host networking tool (ip, nft, nsenter) with `input` on stdin; rejects with its stderr.
 * Batches (`ip -batch -`, `nft -f -`) keep a machine's setup to a few processes.
 */
export function run(cmd: string, args: string[], input?: string, timeoutMs = 10_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(Buffer.concat(out).toString('utf8'));
      else
        reject(
          new Error(
            `${cmd} ${args.join(' ')}: ${signal ? `killed (${signal})` : `exit ${code}`}: ${Buffer.concat(err).toString('utf8').trim().slice(0, 800)}`,
          ),
        );
    });
    child.stdin.on('error', () => {
      // the tool may exit before reading everything: its exit code says what happened
    });
    child.stdin.end(input ?? '');
  });
}

/** Runs a command inside a named network namespace (and nothing else of it: no mount namespace). */
export function inNetns(netns: string, cmd: string, args: string[], input?: string): Promise<string> {
  return run('nsenter', [`--net=/run/netns/${netns}`, '--', cmd, ...args], input);
}
