import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import {
  AgentCancelledError,
  AgentClosedError,
  type AgentConnection,
  AgentError,
  AgentTimeoutError,
  connectAgent,
  type ExecHandle,
  MAX_IGNORED_FRAMES,
} from '../../src/guest/agent-connection.js';
import {
  encodeFrame,
  encodeTlv,
  FrameType,
  INITIAL_WINDOW,
  MAX_PAYLOAD,
  ProtocolError,
} from '../../src/guest/protocol.js';
import { encodeCredit } from '../../src/guest/protocol-messages.js';
import { AgentProcess, FakeAgent, SocketServer, tempSocketDir } from '../helpers/agent-harness.js';

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

async function readAll(r: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of r) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

async function waitUntil(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Resolves with the accumulated output once it matches `re`. */
function waitForOutput(r: Readable, re: RegExp, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const timer = setTimeout(() => {
      r.off('data', onData);
      reject(new Error(`output never matched ${re}: ${JSON.stringify(text)}`));
    }, timeoutMs);
    const onData = (d: Buffer): void => {
      text += d.toString('utf8');
      if (re.test(text)) {
        clearTimeout(timer);
        r.off('data', onData);
        r.pause();
        resolve(text);
      }
    };
    r.on('data', onData);
    r.resume();
  });
}

/** Whether a process exists and is not a zombie (an orphan may wait a while to be reaped). */
function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\S+ \(.*\) [ZX]/s.test(stat);
  } catch {
    return false;
  }
}

describe('AgentConnection against the real agent', { timeout: 40000 }, () => {
  let agent: AgentProcess;
  let conn: AgentConnection;
  let scratch: string;

  before(async () => {
    agent = await AgentProcess.start();
    conn = await agent.connect();
    scratch = mkdtempSync(path.join(os.tmpdir(), 'hutch-agent-files-'));
  });

  after(async () => {
    if (agent.child.exitCode === null) await agent.hangUp(conn);
    await agent.stop();
    rmSync(scratch, { recursive: true, force: true });
  });

  it('answers PING', async () => {
    const ms = await conn.ping(2000);
    assert.ok(ms >= 0 && ms < 2000);
  });

  it('runs echo', async () => {
    const h = conn.exec({ argv: ['echo', 'hello', 'world'] });
    const { pid } = await h.started;
    assert.ok(pid > 1);
    const [out, err, res] = await Promise.all([readAll(h.stdout), readAll(h.stderr), h.result]);
    assert.equal(out.toString(), 'hello world\n');
    assert.equal(err.length, 0);
    assert.deepEqual(res, { exitCode: 0, signal: null, timedOut: false });
  });

  it('separates stderr and reports exit codes, env and cwd', async () => {
    const r = await conn.execCollect(
      { argv: ['sh', '-c', 'echo "out $FOO"; pwd; echo err >&2; exit 7'], env: { FOO: 'bar' }, cwd: '/tmp' },
      { maxOutputBytes: 1024 },
    );
    assert.equal(r.stdout.toString(), 'out bar\n/tmp\n');
    assert.equal(r.stderr.toString(), 'err\n');
    assert.equal(r.exitCode, 7);
    assert.equal(r.signal, null);
    assert.equal(r.truncated, false);
  });

  it('reports death by signal, and delivers signal()', async () => {
    const r = await conn.execCollect({ argv: ['sh', '-c', 'kill -TERM $$'] }, { maxOutputBytes: 10 });
    assert.equal(r.exitCode, null);
    assert.equal(r.signal, 15);
    const h = conn.exec({ argv: ['sleep', '30'] });
    await h.started;
    h.signal(10); // SIGUSR1
    assert.deepEqual(await h.result, { exitCode: null, signal: 10, timedOut: false });
  });

  it('streams stdin larger than the window, in order', async () => {
    const input = randomBytes(3 * INITIAL_WINDOW + 12345);
    const h = conn.exec({ argv: ['sha256sum'], stdin: true });
    const out = readAll(h.stdout);
    // Several writes of awkward sizes, issued without waiting: they must stay in order.
    const writes = [
      h.write(input.subarray(0, 1)),
      h.write(input.subarray(1, 200000)),
      h.write(input.subarray(200000)),
      h.end(),
    ];
    await Promise.all(writes);
    assert.equal(h.stats().sent, input.length);
    assert.equal((await out).toString().split(' ')[0], sha256(input));
    assert.equal((await h.result).exitCode, 0);
    // execCollect's stdin option.
    const r = await conn.execCollect({ argv: ['cat'] }, { stdin: 'via execCollect', maxOutputBytes: 100 });
    assert.equal(r.stdout.toString(), 'via execCollect');
  });

  it('delivers 10 MB of output exactly', async () => {
    const data = randomBytes(10 * 1024 * 1024);
    const file = path.join(scratch, 'ten-mb');
    writeFileSync(file, data);
    const h = conn.exec({ argv: ['cat', file] });
    const out = await readAll(h.stdout);
    assert.equal((await h.result).exitCode, 0);
    assert.equal(out.length, data.length);
    assert.ok(out.equals(data), 'bytes differ');
  });

  it('stops the agent when the consumer does not read (bounded memory)', async () => {
    const h = conn.exec({ argv: ['head', '-c', String(8 * 1024 * 1024), '/dev/zero'] });
    // Nobody reads stdout: the agent may send one window and must then wait.
    await waitUntil(() => h.stats().received >= INITIAL_WINDOW, 5000, 'a full window');
    await sleep(300);
    const s = h.stats();
    assert.equal(s.received, INITIAL_WINDOW, 'the agent sent more than the window');
    assert.equal(s.queued, INITIAL_WINDOW);
    assert.equal(s.consumed, 0);
    // Reading resumes the flow, and everything arrives.
    const out = await readAll(h.stdout);
    assert.equal(out.length, 8 * 1024 * 1024);
    assert.equal((await h.result).exitCode, 0);
    // A slow reader: the host never holds more than the window plus the Readable's buffer.
    const h2 = conn.exec({ argv: ['head', '-c', String(4 * 1024 * 1024), '/dev/zero'] });
    let total = 0;
    let maxQueued = 0;
    for await (const chunk of h2.stdout) {
      total += (chunk as Buffer).length;
      maxQueued = Math.max(maxQueued, h2.stats().queued);
      if (total % (1024 * 1024) < 65536) await sleep(20);
    }
    assert.equal(total, 4 * 1024 * 1024);
    assert.ok(maxQueued <= INITIAL_WINDOW, `queued ${maxQueued}`);
  });

  it('truncates execCollect output at maxOutputBytes but drains the rest', async () => {
    const r = await conn.execCollect(
      { argv: ['sh', '-c', 'head -c 2000000 /dev/zero; echo tail >&2'] },
      { maxOutputBytes: 1000 },
    );
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout.length, 1000);
    assert.equal(r.stderr.toString(), 'tail\n');
    assert.equal(r.truncated, true);
  });

  it('kills a command at its timeout', async () => {
    const t0 = Date.now();
    const r = await conn.execCollect({ argv: ['sleep', '20'], timeoutMs: 300 }, { maxOutputBytes: 10 });
    assert.deepEqual(
      { exitCode: r.exitCode, signal: r.signal, timedOut: r.timedOut },
      { exitCode: null, signal: 9, timedOut: true },
    );
    assert.ok(Date.now() - t0 < 3000);
  });

  it('rejects a missing program with ENOENT', async () => {
    const h = conn.exec({ argv: ['/no/such/program-xyz'] });
    await assert.rejects(h.started, (e: unknown) => e instanceof AgentError && e.code === 'ENOENT');
    await assert.rejects(h.result, (e: unknown) => e instanceof AgentError && e.code === 'ENOENT');
    assert.equal((await readAll(h.stdout)).length, 0);
    await assert.rejects(
      conn.execCollect({ argv: ['no-such-program-xyz'] }, { maxOutputBytes: 10 }),
      (e: unknown) => e instanceof AgentError && e.code === 'ENOENT' && /no-such-program-xyz/.test(e.message),
    );
  });

  it('runs a PTY and resizes it', async () => {
    const h = conn.exec({
      argv: ['sh', '-c', 'stty size; read x; stty size; echo "term=$TERM"'],
      pty: { cols: 80, rows: 24 },
      stdin: true,
    });
    await waitForOutput(h.stdout, /24 80/);
    h.resize(132, 43);
    await h.write('go\n');
    const rest = await waitForOutput(h.stdout, /term=\S+/);
    assert.match(rest, /43 132/);
    assert.match(rest, /term=xterm-256color/);
    h.stdout.resume();
    assert.equal((await h.result).exitCode, 0);
  });

  it('runs 20 commands concurrently', async () => {
    const runs = Array.from({ length: 20 }, (_, i) =>
      conn.execCollect(
        {
          argv: [
            'sh',
            '-c',
            'sleep 0.05; head -c $((100000 + $1)) /dev/zero | wc -c; echo $1 >&2',
            'sh',
            String(i),
          ],
        },
        { maxOutputBytes: 1000 },
      ),
    );
    const results = await Promise.all(runs);
    results.forEach((r, i) => {
      assert.equal(r.exitCode, 0);
      assert.equal(r.stdout.toString().trim(), String(100000 + i));
      assert.equal(r.stderr.toString(), `${i}\n`);
    });
    assert.equal(conn.stats.openStreams, 0);
  });

  it('round-trips a 5 MB binary file', async () => {
    const data = randomBytes(5 * 1024 * 1024 + 7);
    const target = path.join(scratch, 'sub', 'dir', 'blob.bin');
    assert.deepEqual(await conn.writeFile(target, data, { mode: 0o600, mkdirs: true }), {
      size: data.length,
    });
    assert.equal(sha256(readFileSync(target)), sha256(data));
    assert.equal(statSync(target).mode & 0o777, 0o600);
    const rf = conn.readFile(target);
    const back = await readAll(rf.stream);
    assert.equal(sha256(back), sha256(data));
    const done = await rf.done;
    assert.equal(done.size, data.length);
    assert.equal(done.mode & 0o777, 0o600);
    // From a Readable with odd chunk sizes, over an existing file.
    const parts: Buffer[] = [];
    for (let off = 0; off < data.length; off += 100003) parts.push(data.subarray(off, off + 100003));
    assert.deepEqual(await conn.writeFile(target, Readable.from(parts)), { size: data.length });
    assert.ok(readFileSync(target).equals(data));
  });

  it('reads a missing file as ENOENT', async () => {
    const rf = conn.readFile(path.join(scratch, 'missing'));
    await assert.rejects(rf.done, (e: unknown) => e instanceof AgentError && e.code === 'ENOENT');
    const rf2 = conn.readFile(path.join(scratch, 'missing-2'));
    await assert.rejects(readAll(rf2.stream), (e: unknown) => e instanceof AgentError && e.code === 'ENOENT');
    await assert.rejects(
      conn.writeFile(path.join(scratch, 'no', 'dir', 'f'), Buffer.from('x')),
      (e: unknown) => e instanceof AgentError && e.code === 'ENOENT',
    );
    assert.throws(() => conn.readFile('relative/path'), TypeError);
  });

  it('cancels a command and keeps the connection usable', async () => {
    const h = conn.exec({ argv: ['sh', '-c', 'yes'] });
    const { pid } = await h.started;
    await waitUntil(() => h.stats().received > 0, 3000, 'output');
    h.cancel();
    await assert.rejects(h.result, (e: unknown) => e instanceof AgentCancelledError);
    await waitUntil(() => !processAlive(pid), 3000, 'the process to die');
    const r = await conn.execCollect({ argv: ['echo', 'still here'] }, { maxOutputBytes: 100 });
    assert.equal(r.stdout.toString(), 'still here\n');
    // A read abandoned by its consumer is cancelled too.
    const big = path.join(scratch, 'ten-mb');
    const rf = conn.readFile(big);
    rf.stream.once('data', () => rf.stream.destroy());
    await assert.rejects(rf.done, (e: unknown) => e instanceof AgentCancelledError);
    assert.ok((await conn.ping(2000)) >= 0);
  });

  it('rejects everything pending when the connection closes', async () => {
    const h = conn.exec({ argv: ['sleep', '30'] });
    const { pid } = await h.started;
    const rf = conn.readFile(path.join(scratch, 'ten-mb'));
    h.stdout.on('error', () => {});
    conn.close();
    await assert.rejects(h.result, (e: unknown) => e instanceof AgentClosedError);
    await assert.rejects(rf.done, (e: unknown) => e instanceof AgentClosedError);
    assert.equal(await conn.closed, undefined);
    assert.throws(() => conn.exec({ argv: ['true'] }), AgentClosedError);
    await assert.rejects(conn.ping(100), AgentClosedError);
    // The agent kills the processes of a host that went away; it then serves a new host.
    await waitUntil(() => !processAlive(pid), 3000, 'the agent to kill the process');
    conn = await agent.connect();
    assert.equal((await conn.execCollect({ argv: ['true'] }, { maxOutputBytes: 1 })).exitCode, 0);
  });

  it('refuses bad requests before sending anything', () => {
    assert.throws(() => conn.exec({ argv: [] }), TypeError);
    assert.throws(() => conn.exec({ argv: ['a\0b'] }), TypeError);
    assert.throws(() => conn.exec({ argv: ['true'], timeoutMs: -1 }), RangeError);
    assert.equal(conn.stats.openStreams, 0);
  });

  it('powers off (last: the agent exits in --connect mode)', async () => {
    const h = conn.exec({ argv: ['sleep', '30'] });
    const { pid } = await h.started;
    const exited = new Promise<number | null>((resolve) => agent.child.once('exit', (code) => resolve(code)));
    await conn.poweroff();
    assert.equal(await conn.closed, undefined);
    await assert.rejects(h.result, AgentClosedError);
    assert.equal(await exited, 0);
    await waitUntil(() => !processAlive(pid), 3000, 'the process to die');
  });
});

describe('connectAgent', { timeout: 20000 }, () => {
  it('retries until the socket exists, then discards stray bytes before the PONG', async () => {
    const tmp = tempSocketDir('hutch-connect-');
    const connP = connectAgent(tmp.socketPath, { timeoutMs: 5000 });
    await sleep(150); // connectAgent keeps retrying: the socket does not exist yet
    const server = await SocketServer.listen(tmp.socketPath);
    const peer = await server.accept(3000);
    const ping = await new Promise<Buffer>((resolve) => peer.once('data', (d: Buffer) => resolve(d)));
    assert.equal(ping.length, 9 + 16);
    assert.equal(ping[4], FrameType.PING);
    const nonce = ping.subarray(9);
    const stale = Buffer.concat([
      Buffer.from('\x00\x00\x00\x05garbage from an old connection'),
      encodeFrame(FrameType.PONG, 0, Buffer.alloc(16)), // a PONG with another nonce
      encodeFrame(FrameType.STDOUT, 1, Buffer.from('stale')),
    ]);
    // The stray bytes, the PONG and an unknown-stream frame, cut into tiny pieces.
    const wire = Buffer.concat([
      stale,
      encodeFrame(FrameType.PONG, 0, nonce),
      encodeFrame(FrameType.STDOUT, 77, Buffer.from('x')),
    ]);
    for (let i = 0; i < wire.length; i += 3) peer.write(wire.subarray(i, i + 3));
    // The second half of the handshake: HELLO and a fencing PING, answered like a
    // protocol-1 agent (no HELLO, just the PONG).
    const hello = await new Promise<Buffer>((resolve) => peer.once('data', (d: Buffer) => resolve(d)));
    assert.equal(hello[4], FrameType.HELLO);
    const fence = hello.subarray(hello.readUInt32BE(0) + 4);
    assert.equal(fence[4], FrameType.PING);
    peer.write(encodeFrame(FrameType.PONG, 0, fence.subarray(9)));
    const conn = await connP;
    assert.equal(conn.features.version, 1);
    await waitUntil(() => conn.stats.ignoredFrames === 1, 2000, 'the frame after the PONG');
    assert.equal(conn.isOpen, true);
    conn.close();
    await server.close();
    tmp.remove();
  });

  it('times out when nothing answers, and honours an abort signal', async () => {
    const tmp = tempSocketDir('hutch-connect-');
    const t0 = Date.now();
    await assert.rejects(connectAgent(tmp.socketPath, { timeoutMs: 200 }), AgentTimeoutError);
    assert.ok(Date.now() - t0 < 1500);
    const server = await SocketServer.listen(tmp.socketPath);
    await assert.rejects(connectAgent(tmp.socketPath, { timeoutMs: 300 }), AgentTimeoutError);
    const ac = new AbortController();
    const p = connectAgent(tmp.socketPath, { timeoutMs: 5000, signal: ac.signal });
    setTimeout(() => ac.abort(new Error('stop')), 100);
    await assert.rejects(p, /stop/);
    await server.close();
    tmp.remove();
  });
});

describe('hostile agent', { timeout: 20000 }, () => {
  // Nothing a hostile agent sends may surface as an uncaught exception or rejection.
  const escaped: unknown[] = [];
  const onEscape = (e: unknown): void => {
    escaped.push(e);
  };
  before(() => {
    process.on('uncaughtException', onEscape);
    process.on('unhandledRejection', onEscape);
  });
  after(() => {
    process.off('uncaughtException', onEscape);
    process.off('unhandledRejection', onEscape);
    assert.deepEqual(escaped, []);
  });

  /** Runs `fn` against a fresh fake agent, stopping it whatever happens. */
  async function withFake(fn: (fake: FakeAgent) => Promise<void>): Promise<void> {
    const fake = await FakeAgent.start();
    try {
      await fn(fake);
    } finally {
      await fake.stop();
    }
  }

  async function expectClosed(fake: FakeAgent, kind: string): Promise<void> {
    const reason = await fake.conn.closed;
    assert.ok(reason instanceof ProtocolError, `closed with ${String(reason)}`);
    assert.equal(reason.kind, kind);
    assert.equal(fake.conn.isOpen, false);
  }

  async function startedExec(fake: FakeAgent): Promise<{ h: ExecHandle; id: number }> {
    const h = fake.conn.exec({ argv: ['x'], stdin: true });
    const f = await fake.next(FrameType.EXEC);
    fake.send(encodeFrame(FrameType.STARTED, f.stream, Buffer.from([0, 0, 0, 42])));
    assert.deepEqual(await h.started, { pid: 42 });
    return { h, id: f.stream };
  }

  it('closes on garbage and fails pending operations with the ProtocolError as cause', async () =>
    withFake(async (fake) => {
      const h = fake.conn.exec({ argv: ['sleep', '1'] });
      await fake.next(FrameType.EXEC);
      fake.send(Buffer.from('GARBAGE GARBAGE GARBAGE'));
      await expectClosed(fake, 'too-large');
      await assert.rejects(
        h.result,
        (e: unknown) =>
          e instanceof AgentClosedError && e.cause instanceof ProtocolError && e.cause.kind === 'too-large',
      );
    }));

  for (const [name, bytes, kind] of [
    ['an oversize frame header', Buffer.from([0x00, 0x01, 0x00, 0x06, FrameType.STDOUT]), 'too-large'],
    ['a 4 GiB frame header', Buffer.from([0xff, 0xff, 0xff, 0xff]), 'too-large'],
    ['a too-small frame', Buffer.from([0, 0, 0, 4, 1, 2, 3, 4]), 'too-small'],
    ['a truncated TLV', encodeFrame(FrameType.EXIT, 1, Buffer.from([1, 0, 0, 0, 4, 0])), 'truncated'],
    ['a host-only frame', encodeFrame(FrameType.EXEC, 1), 'unexpected'],
  ] as const) {
    it(`closes on ${name}`, async () =>
      withFake(async (fake) => {
        fake.send(bytes);
        await expectClosed(fake, kind);
      }));
  }

  it('closes when the agent overruns a window, without buffering past it', async () =>
    withFake(async (fake) => {
      const { h, id } = await startedExec(fake);
      const chunk = Buffer.alloc(MAX_PAYLOAD, 0x61);
      for (let i = 0; i < 4; i++) fake.send(encodeFrame(FrameType.STDOUT, id, chunk));
      await waitUntil(() => h.stats().received === INITIAL_WINDOW, 2000, 'a full window');
      assert.equal(fake.conn.isOpen, true);
      fake.send(encodeFrame(FrameType.STDERR, id, Buffer.from('1 byte too many')));
      await expectClosed(fake, 'window');
      assert.equal(h.stats().received, INITIAL_WINDOW);
      await assert.rejects(h.result, AgentClosedError);
    }));

  it('credits exactly what the consumer read', async () =>
    withFake(async (fake) => {
      const { h, id } = await startedExec(fake);
      const chunk = Buffer.alloc(MAX_PAYLOAD, 0x62);
      for (let i = 0; i < 4; i++) fake.send(encodeFrame(FrameType.STDOUT, id, chunk));
      await waitUntil(() => h.stats().received === INITIAL_WINDOW, 2000, 'a full window');
      assert.equal(fake.received.filter((f) => f.type === FrameType.CREDIT).length, 0);
      let read = 0;
      h.stdout.on('data', (d: Buffer) => {
        read += d.length;
      });
      const credited = (): number =>
        fake.received
          .filter((f) => f.type === FrameType.CREDIT)
          .reduce((n, f) => n + f.payload.readUInt32BE(0), 0);
      await fake.waitFor(() => credited() === INITIAL_WINDOW);
      assert.equal(read, INITIAL_WINDOW);
      // With the window re-opened, another full window is fine.
      for (let i = 0; i < 4; i++) fake.send(encodeFrame(FrameType.STDOUT, id, chunk));
      fake.send(encodeFrame(FrameType.EXIT, id, encodeTlv([{ tag: 1, value: Buffer.from([0, 0, 0, 0]) }])));
      assert.deepEqual(await h.result, { exitCode: 0, signal: null, timedOut: false });
      await waitUntil(() => read === 2 * INITIAL_WINDOW, 2000, 'all output');
      assert.equal(fake.conn.isOpen, true);
    }));

  it('sends stdin and file data only within the window the agent grants', async () =>
    withFake(async (fake) => {
      const { h, id } = await startedExec(fake);
      const stdinBytes = (): number =>
        fake.received
          .filter((f) => f.type === FrameType.STDIN && f.stream === id)
          .reduce((n, f) => n + f.payload.length, 0);
      const w = h.write(Buffer.alloc(1024 * 1024, 1));
      await fake.waitFor(() => stdinBytes() === INITIAL_WINDOW);
      await sleep(100);
      assert.equal(stdinBytes(), INITIAL_WINDOW);
      fake.send(encodeCredit(id, 100000));
      await fake.waitFor(() => stdinBytes() === INITIAL_WINDOW + 100000);
      fake.send(encodeCredit(id, 1024 * 1024));
      await w;
      await fake.waitFor(() => stdinBytes() === 1024 * 1024);
      assert.ok(fake.received.every((f) => f.payload.length <= MAX_PAYLOAD));
      // writeFile: DATA frames of at most 64 KiB, then the empty end-of-file frame.
      const wf = fake.conn.writeFile('/f', Buffer.alloc(300000, 2), { mkdirs: true });
      const open = await fake.next(FrameType.FILE_WRITE);
      const dataBytes = (): number =>
        fake.received
          .filter((f) => f.type === FrameType.DATA && f.stream === open.stream)
          .reduce((n, f) => n + f.payload.length, 0);
      await fake.waitFor(() => dataBytes() === INITIAL_WINDOW);
      fake.send(encodeCredit(open.stream, INITIAL_WINDOW));
      await fake.waitFor(() =>
        fake.received.some((f) => f.type === FrameType.DATA && f.payload.length === 0),
      );
      assert.equal(dataBytes(), 300000);
      const size = Buffer.alloc(8);
      size.writeBigUInt64BE(300000n);
      fake.send(encodeFrame(FrameType.DONE, open.stream, encodeTlv([{ tag: 1, value: size }])));
      assert.deepEqual(await wf, { size: 300000 });
    }));

  it('ignores a few frames for unknown streams, and closes on a flood of them', async () =>
    withFake(async (fake) => {
      for (let i = 0; i < 10; i++) fake.send(encodeFrame(FrameType.STDOUT, 999, Buffer.from('?')));
      fake.send(encodeFrame(FrameType.CREDIT, 0, Buffer.from([0, 0, 0, 1])));
      await waitUntil(() => fake.conn.stats.ignoredFrames === 11, 2000, 'ignored frames');
      assert.ok((await fake.conn.ping(1000)) >= 0);
      const flood = Buffer.concat(
        Array.from({ length: MAX_IGNORED_FRAMES }, (_, i) =>
          encodeFrame(FrameType.STDOUT, 1000 + i, Buffer.from('!')),
        ),
      );
      fake.send(flood);
      await expectClosed(fake, 'unknown-stream');
    }));

  it('closes on frames out of order for a stream', async () =>
    withFake(async (fake) => {
      const h = fake.conn.exec({ argv: ['x'] });
      const f = await fake.next(FrameType.EXEC);
      fake.send(encodeFrame(FrameType.STDOUT, f.stream, Buffer.from('before STARTED')));
      await expectClosed(fake, 'unexpected');
      await assert.rejects(h.started, AgentClosedError);
    }));

  it('survives the agent hanging up mid-operation', async () =>
    withFake(async (fake) => {
      const { h } = await startedExec(fake);
      const rf = fake.conn.readFile('/x');
      fake.peer.destroy();
      const reason = await fake.conn.closed;
      assert.ok(reason instanceof Error && !(reason instanceof ProtocolError));
      await assert.rejects(h.result, AgentClosedError);
      await assert.rejects(rf.done, AgentClosedError);
      await assert.rejects(h.write('x'), Error);
    }));
});
