import { spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';

/** Runs a build step, its output going to a log file; rejects with the log's tail on failure. */
export function runLogged(cmd: string, args: string[], logPath: string): Promise<void> {
  const fd = openSync(logPath, 'a');
  return new Promise<void>((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', fd, fd] });
    child.on('error', (e) => {
      closeSync(fd);
      reject(new Error(`${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      closeSync(fd);
      if (code === 0) return resolve();
      const tail = readFileSync(logPath, 'utf8').split('\n').slice(-25).join('\n');
      reject(
        new Error(`${cmd} ${args.join(' ')} failed (${signal ?? `exit ${code}`}); log ${logPath}:\n${tail}`),
      );
    });
  });
}

/** Runs a short command and returns its stdout (throws with stderr on failure). */
export async function runCapture(cmd: string, args: string[]): Promise<string> {
  return (await runCaptureBytes(cmd, args)).toString();
}

/** runCapture, with stdout as the exact bytes written (for hashing them). */
export function runCaptureBytes(cmd: string, args: string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (b: Buffer) => {
      out.push(b);
    });
    child.stderr.on('data', (b: Buffer) => {
      err += b.toString();
    });
    child.on('error', (e) => reject(new Error(`${cmd}: ${e.message}`)));
    child.on('close', (code) =>
      code === 0
        ? resolve(Buffer.concat(out))
        : reject(new Error(`${cmd} ${args.join(' ')}: ${err.trim() || `exit ${code}`}`)),
    );
  });
}
