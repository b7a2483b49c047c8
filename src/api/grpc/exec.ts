import type { ServerDuplexStream } from '@grpc/grpc-js';
import { HutchError } from '../../errors.js';
import type { GuestProcess } from '../../guest/guest-ops.js';
import { text, vmRef } from './args.js';
import { bidi, type Cx, type Rpc } from './rpc.js';

/**
 * Exec (bidirectional): the first client message names the VM and the command (run as
 * `/bin/sh -c command`, on a PTY when `tty`); later messages with `stdin` set feed its standard
 * input. Server messages carry its output as it is produced (stdout and stderr interleaved: the
 * proto has one `data`; on a PTY there is only the terminal), and the last one carries exit_code.
 */

interface ExecChunk {
  data: Buffer;
  stdin: boolean;
  tty: boolean;
  command: string;
  vm_id: string;
  exit_code: number;
}

type Call = ServerDuplexStream<ExecChunk, Partial<ExecChunk>>;

/** A client that opens an Exec and says nothing holds a call slot: it gets this long to start. */
const firstMessageTimeoutMs = 30_000;
/** The command string goes to the agent in one request frame, with the box's environment. */
const maxCommandBytes = 64 * 1024;
/** A terminal's size when the client asks for a PTY (the proto has no size field). */
const ptySize = { cols: 80, rows: 24 };

/**
 * The client's messages one at a time, pulled (so gRPC flow control holds a client that sends
 * faster than the guest takes stdin). Not the stream's async iterator: that destroys the call
 * when the client half-closes, and the output and exit code could no longer be sent.
 */
class Messages {
  private wake: (() => void) | undefined;
  private over = false;

  constructor(private readonly call: Call) {
    const poke = (): void => {
      const w = this.wake;
      this.wake = undefined;
      w?.();
    };
    call.on('readable', poke);
    call.on('end', () => {
      this.over = true;
      poke();
    });
    call.on('close', () => {
      this.over = true;
      poke();
    });
    // A failed read ends the messages; the call's status is sent by the handler.
    call.on('error', () => {
      this.over = true;
      poke();
    });
  }

  /** The next message, or undefined once the client half-closed (or went away). */
  async next(): Promise<ExecChunk | undefined> {
    for (;;) {
      const m = this.call.read() as ExecChunk | null;
      if (m !== null) return m;
      if (this.over || this.call.readableEnded || this.call.destroyed) return undefined;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
  }
}

async function firstMessage(messages: Messages): Promise<ExecChunk> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          new HutchError(
            'INVALID_ARGUMENT',
            `Exec got no first message (vm_id and command) within ${firstMessageTimeoutMs / 1000} s`,
          ),
        ),
      firstMessageTimeoutMs,
    );
  });
  try {
    const m = await Promise.race([messages.next(), timeout]);
    if (!m) throw new HutchError('INVALID_ARGUMENT', 'Exec needs a first message with vm_id and command');
    return m;
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves when the call's outgoing buffer drained, or the call is over (then writing stops). */
function drained(call: Call): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      call.off('drain', done);
      call.off('cancelled', done);
      call.off('close', done);
      resolve();
    };
    call.on('drain', done);
    call.on('cancelled', done);
    call.on('close', done);
  });
}

/**
 * Client messages after the first → stdin. An empty stdin message means EOF (the proto has no
 * separate field for it; an empty write would mean nothing anyway), and so does the client
 * half-closing its side. Messages without `stdin` set carry nothing for us and are skipped.
 * One message is read only after the previous one was taken by the guest's window, so a client
 * flooding stdin is held by gRPC flow control instead of buffered here.
 */
async function feedStdin(messages: Messages, first: ExecChunk, p: GuestProcess): Promise<void> {
  if (first.stdin) {
    if (first.data.length === 0) return p.end();
    await p.write(first.data);
  }
  for (;;) {
    const m = await messages.next();
    if (!m) break;
    if (!m.stdin) continue;
    if (m.data.length === 0) break;
    await p.write(m.data);
  }
  await p.end();
}

async function exec(call: Call, cx: Cx): Promise<void> {
  const messages = new Messages(call);
  const first = await firstMessage(messages);
  const vm = vmRef(first.vm_id);
  if (first.command === '') throw new HutchError('INVALID_ARGUMENT', 'command is required');
  const command = text(first.command, 'command', maxCommandBytes);
  const ops = await cx.act.openBoxSession(vm);
  let p: GuestProcess | undefined;
  // The client cancelling (or its connection going) kills the command.
  const cancel = (): void => p?.cancel();
  call.on('cancelled', cancel);
  try {
    p = await ops.exec({
      argv: ['/bin/sh', '-c', command],
      stdin: true,
      // No time limit: the command lives as long as the call; cancelling the call ends it.
      timeoutMs: 0,
      ...(first.tty ? { pty: ptySize, env: { TERM: 'xterm-256color' } } : {}),
    });
    if (call.cancelled) p.cancel();
    const proc = p;
    feedStdin(messages, first, proc).catch(() => {
      // The client went away mid-stream (cancel handles the command) or the guest did (run fails).
    });
    let result: Awaited<ReturnType<GuestProcess['run']>>;
    try {
      result = await proc.run(async (_stream, chunk) => {
        if (call.cancelled) throw new HutchError('INVALID_ARGUMENT', 'the client went away');
        // Waits while the client is not taking output: a fast producer is held in the guest.
        if (!call.write({ data: chunk })) await drained(call);
      });
    } catch (e) {
      proc.cancel();
      throw e;
    }
    const code = result.exitCode ?? (result.signal !== null ? 128 + result.signal : -1);
    call.write({ exit_code: code });
  } finally {
    call.off('cancelled', cancel);
    ops.release();
  }
}

export const execRpcs: Record<string, Rpc> = { Exec: bidi(exec) };
