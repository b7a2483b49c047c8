import { HutchError } from '../../errors.js';
import type { GuestProcess } from '../../guest/guest-ops.js';

/** What the volume code needs of a machine: to start a command (GuestOps has it). */
export interface TarGuest {
  exec(req: { argv: string[]; stdin?: boolean; timeoutMs?: number }): Promise<GuestProcess>;
}

/** The tail of a command's stderr, for the error message; the rest is dropped. */
class Tail {
  private buf = Buffer.alloc(0);
  constructor(private readonly max = 4096) {}
  push(b: Buffer): void {
    this.buf = Buffer.concat([this.buf, b]);
    if (this.buf.length > this.max) this.buf = this.buf.subarray(this.buf.length - this.max);
  }
  get text(): string {
    return this.buf.toString('utf8').trim();
  }
}

/** GNU tar's exit 1 on create: only files that changed while they were read (a live machine's). */
function onlyChangedWhileRead(stderr: string): boolean {
  const lines = stderr.split('\n').filter((l) => l.trim() !== '');
  return (
    lines.length > 0 &&
    lines.every((l) =>
      /file changed as we read it|Exiting with failure status due to previous errors/.test(l),
    )
  );
}

const status = (r: { exitCode: number | null; signal: number | null; timedOut: boolean }): string =>
  r.timedOut ? 'timed out' : r.signal !== null ? `killed by signal ${r.signal}` : `exit ${r.exitCode}`;

/**
 * `tar -C /root --numeric-owner -cf - .` in the machine, each piece of its output handed to
 * `onChunk` and awaited (the agent's window is the backpressure: the guest's tar waits while
 * the store is behind). A tar that fails is VOLUME_SAVE_FAILED with its stderr; exit 1 for files
 * that changed while they were read is accepted (the save is of a running machine).
 */
export async function tarOut(
  guest: TarGuest,
  onChunk: (chunk: Buffer) => Promise<void>,
): Promise<{ warnings: string }> {
  const proc = await guest.exec({
    argv: ['tar', '-C', '/root', '--numeric-owner', '-cf', '-', '.'],
    timeoutMs: 0,
  });
  const stderr = new Tail();
  let r: Awaited<ReturnType<GuestProcess['run']>>;
  try {
    r = await proc.run(async (stream, chunk) => {
      if (stream === 'stdout') await onChunk(chunk);
      else stderr.push(chunk);
    });
  } catch (e) {
    proc.cancel();
    throw e;
  }
  if (r.exitCode === 0 || (r.exitCode === 1 && onlyChangedWhileRead(stderr.text)))
    return { warnings: stderr.text };
  throw new HutchError(
    'VOLUME_SAVE_FAILED',
    `tar in the machine failed (${status(r)})${stderr.text ? `: ${stderr.text}` : ''}; the volume is unchanged`,
  );
}

/**
 * `tar -C /root --numeric-owner -xpf -` in the machine, fed by `produce` through the command's
 * stdin (each write waits for the agent's window). A tar that exits early, or not with 0, is
 * VOLUME_RESTORE_FAILED with its stderr; a failure of `produce` (the store) cancels it.
 */
export async function tarIn(
  guest: TarGuest,
  produce: (sink: (chunk: Buffer) => Promise<void>) => Promise<void>,
): Promise<void> {
  const proc = await guest.exec({
    argv: ['tar', '-C', '/root', '--numeric-owner', '-xpf', '-'],
    stdin: true,
    timeoutMs: 0,
  });
  const stderr = new Tail();
  const running = proc.run((_stream, chunk) => stderr.push(chunk));
  // Settles when tar ends: writes after that (tar stopped reading, at the archive's end or on
  // an error) do not wait for a reader that is gone; its exit status says which it was.
  const over = running.then(
    () => undefined,
    (e: unknown) => {
      throw e;
    },
  );
  over.catch(() => {});
  let exited = false;
  void over.then(
    () => {
      exited = true;
    },
    () => {},
  );
  const gone = new Error('tar exited');
  try {
    await produce(async (chunk) => {
      if (!exited) await Promise.race([proc.write(chunk), over]);
      // Nothing more is read: stop producing (the exit status below says why).
      if (exited) throw gone;
    });
    if (!exited) await Promise.race([proc.end(), over]);
  } catch (e) {
    if (e === gone) return checkExtract(await running, stderr);
    proc.cancel();
    await running.catch(() => {});
    throw e;
  }
  checkExtract(await running, stderr);
}

function checkExtract(
  r: { exitCode: number | null; signal: number | null; timedOut: boolean },
  stderr: Tail,
): void {
  if (r.exitCode !== 0)
    throw new HutchError(
      'VOLUME_RESTORE_FAILED',
      `tar in the machine could not unpack the volume (${status(r)})${stderr.text ? `: ${stderr.text}` : ''}`,
    );
}
