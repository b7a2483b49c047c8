/**
 * Stream abusers: clients that push bytes into the daemon faster than anything downstream takes
 * them, or take nothing of what it sends. Against a real daemon and real VMs: a flood into
 * /tty, a flood into a box's attach, an SSE reader that stalls on a big exec, viewers that
 * never read a console the guest floods, and buffered execs with large binary output at once.
 * For each, the daemon must stay alive, its peak RSS (VmHWM, reset before each abuser) must stay
 * within a stated bound over its RSS just before, and the machine or box must still work.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { connect } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { api, cleanup, sleep, startDaemon, type TestDaemon, until, waitFor } from '../helpers/daemon.js';
import { bugLines, memoryOf, processAlive, Tally } from '../helpers/hostile.js';

const MiB = 1024 * 1024;

/**
 * What one abuser may grow the daemon by (peak RSS over its RSS just before), MiB. Before these
 * channels were bounded every abuser here took +150 to +1000 MiB; bounded, they take +5 to +20
 * (buffered execs: their budget, plus output dropped past it that the GC has not collected yet).
 */
const growthBoundMb = 64;
/** The default HUTCH_EXEC_BUFFER_BYTES: buffered execs may hold that much on top. */
const execBufferMb = 64;

/** Forgets the daemon's peak RSS, so VmHWM afterwards is the peak under the next abuser. */
function resetPeak(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

/** A client that opens a WebSocket and keeps what it receives as text (bounded: the tail). */
interface Client {
  ws: WebSocket;
  tail(): string;
  received(): number;
  closed: Promise<{ code: number; reason: string }>;
}

function open(url: string): Promise<Client> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    let tail = '';
    let received = 0;
    const closed = new Promise<{ code: number; reason: string }>((r) =>
      ws.on('close', (code, reason) => r({ code, reason: reason.toString('utf8') })),
    );
    ws.on('message', (data: Buffer) => {
      received += data.length;
      tail = (tail + data.toString('latin1')).slice(-64 * 1024);
    });
    ws.once('open', () => resolve({ ws, tail: () => tail, received: () => received, closed }));
    ws.once('error', reject);
  });
}

/**
 * Sends `total` bytes of keyboard input (lines of `a` each ended by Ctrl-U, so no shell or line
 * discipline in the guest ever holds a long line) as fast as the connection takes them, for at
 * most `ms` (unbounded, the daemon took 320 MiB in 4–6 s). The client itself waits while its
 * own send queue is over 8 MiB. Returns the bytes that left this client (sent minus queued:
 * in the kernel's socket buffers, the daemon or the guest).
 */
async function flood(ws: WebSocket, total: number, ms: number): Promise<number> {
  const chunk = Buffer.alloc(MiB, 'a');
  for (let i = 1023; i < chunk.length; i += 1024) chunk[i] = 0x15;
  let sent = 0;
  const deadline = Date.now() + ms;
  while (sent < total && Date.now() < deadline && ws.readyState === WebSocket.OPEN) {
    if (ws.bufferedAmount > 8 * MiB) {
      await sleep(5);
      continue;
    }
    ws.send(chunk, { binary: true });
    sent += chunk.length;
  }
  return sent - ws.bufferedAmount;
}

/** Types a command until its output shows up (the console may still be chewing on a flood). */
async function typeUntil(c: Client, line: string, expect: RegExp, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    c.ws.send(Buffer.from(`\x15${line}\r`));
    const next = Date.now() + 3000;
    while (Date.now() < next) {
      if (expect.test(c.tail())) return;
      await sleep(100);
    }
  }
  throw new Error(
    `no ${expect} on the terminal within ${timeoutMs} ms; tail: ${JSON.stringify(c.tail().slice(-300))}`,
  );
}

/** GET that resolves with the response once its headers are in (the body is the caller's). */
function get(socketPath: string, path: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ socketPath, path, host: 'boxrun', method: 'GET' }, resolve);
    req.on('error', reject);
    req.end();
  });
}

/** POST with a JSON body; the reply read as it comes, parsed when it is not absurdly large. */
async function postJson(
  target: { socketPath: string } | { url: string },
  path: string,
  body: unknown,
): Promise<{ status: number; bytes: number; json: Record<string, unknown> | undefined }> {
  const where =
    'socketPath' in target
      ? { socketPath: target.socketPath, host: 'boxrun' }
      : { host: new URL(target.url).hostname, port: new URL(target.url).port };
  const res = await new Promise<IncomingMessage>((resolve, reject) => {
    const req = httpRequest(
      { ...where, path, method: 'POST', headers: { 'content-type': 'application/json' } },
      resolve,
    );
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
  const chunks: Buffer[] = [];
  let bytes = 0;
  for await (const c of res as AsyncIterable<Buffer>) {
    bytes += c.length;
    // Past 256 MiB the reply is a finding in itself: count it, keep nothing more.
    if (bytes <= 256 * MiB) chunks.push(c);
  }
  const json =
    bytes <= 256 * MiB
      ? (JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown>)
      : undefined;
  return { status: res.statusCode ?? 0, bytes, json };
}

describe('hostile streams: floods, never-reading viewers, stalled readers, big buffered execs', {
  timeout: 900_000,
}, () => {
  let d: TestDaemon;
  let pid: number;
  let machine: string;
  let box: string;
  let boxes: BoxesClient;
  const tally = new Tally('streams');
  const peaks: string[] = [];
  const wsUrl = (path: string): string => `${d.url.replace(/^http/, 'ws')}${path}`;
  const attachUrl = (id: string): string =>
    `ws+unix://${d.boxesSocket}:/v1/boxes/${id}/attach?shell=/bin/sh&cols=80&rows=24`;

  /**
   * Runs one abuser: resets the daemon's peak, runs it, then records whether the daemon is alive
   * and its peak stayed within the bound, and whether `works` still passes.
   */
  async function abuse(
    name: string,
    run: () => Promise<string>,
    works: () => Promise<void>,
    boundMb = growthBoundMb,
  ): Promise<void> {
    await sleep(500);
    const base = memoryOf(pid).rssMb;
    resetPeak(pid);
    let detail = '';
    await tally.check(`${name}: the abuse runs to its end`, async () => {
      detail = await run();
      return detail;
    });
    const alive = processAlive(pid);
    const peak = alive ? memoryOf(pid).peakMb : Number.NaN;
    const line = `${name}: daemon peak RSS ${peak} MiB (${base} MiB before, +${peak - base}; bound +${boundMb}) ${detail}`;
    console.log(`hostile streams: ${line}`);
    peaks.push(line);
    tally.record(`${name}: the daemon is alive`, alive);
    tally.record(
      `${name}: peak RSS within ${base} + ${boundMb} MiB`,
      peak <= base + boundMb,
      `peak ${peak} MiB`,
    );
    if (alive)
      await tally.check(`${name}: still works afterwards`, async () => {
        await works();
        return undefined;
      });
  }

  before(async () => {
    d = await startDaemon();
    pid = d.proc.pid ?? 0;
    boxes = new BoxesClient({ socketPath: d.boxesSocket });
    const r = await api(d.url, 'POST', '/v1/machines', {
      template: 'python',
      ttl_seconds: 900,
      mode: 'cold',
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    machine = String(r.body.id);
    box = (await boxes.create<{ id: string }>({ image: 'debian:bookworm', cpu: 1, memory_mb: 256 })).id;
  });
  after(async () => {
    await cleanup(d);
  });

  const machineWorks = async (): Promise<void> => {
    const r = await api(d.url, 'POST', `/v1/machines/${machine}/exec`, { cmd: 'echo alive-$((6*7))' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.stdout, 'alive-42\n');
  };
  const consoleWorks = async (): Promise<void> => {
    const v = await open(wsUrl(`/v1/machines/${machine}/tty`));
    try {
      // The guest's serial port takes input at a few KB/s: what the kernel's socket buffers
      // still held of a flood (~200 KB) takes it a minute or so.
      await typeUntil(v, 'echo tty-alive-$((6*7))', /tty-alive-42/, 180_000);
    } finally {
      v.ws.terminate();
    }
    await machineWorks();
  };
  const boxWorks = async (): Promise<void> => {
    const e = await boxes.exec<{ id: string }>(box, { cmd: ['sh', '-c', 'echo box-alive-$((6*7))'] });
    let out = '';
    for await (const ev of boxes.events(box, e.id)) if (ev.event === 'log') out += ev.data.data;
    assert.equal(out, 'box-alive-42\n');
    const t = await open(attachUrl(box));
    try {
      await typeUntil(t, 'echo attach-alive-$((6*7))', /attach-alive-42/, 90_000);
    } finally {
      t.ws.terminate();
    }
  };

  test('a flood of input into /tty', async () => {
    await abuse(
      'tty input flood',
      async () => {
        const c = await open(wsUrl(`/v1/machines/${machine}/tty`));
        const t0 = Date.now();
        const out = await flood(c.ws, 320 * MiB, 10_000);
        const secs = (Date.now() - t0) / 1000;
        c.ws.terminate();
        return `(${(out / MiB).toFixed(1)} MiB left the client in ${secs.toFixed(1)} s)`;
      },
      consoleWorks,
    );
  });

  test('a flood of input into a box attach', async () => {
    await abuse(
      'boxes attach input flood',
      async () => {
        const c = await open(attachUrl(box));
        const t0 = Date.now();
        const out = await flood(c.ws, 320 * MiB, 10_000);
        const secs = (Date.now() - t0) / 1000;
        c.ws.terminate();
        return `(${(out / MiB).toFixed(1)} MiB left the client in ${secs.toFixed(1)} s)`;
      },
      boxWorks,
    );
  });

  test('an SSE reader that stalls while a box exec prints 256 MiB', async () => {
    const size = 256 * MiB;
    let execId = '';
    let res: IncomingMessage | undefined;
    await abuse(
      'stalled SSE reader',
      async () => {
        const e = await boxes.exec<{ id: string }>(box, {
          cmd: ['sh', '-c', `head -c ${size} /dev/zero | tr '\\0' a`],
          timeout_ms: 300_000,
        });
        execId = e.id;
        res = await get(d.boxesSocket, `/v1/boxes/${box}/exec/${execId}/events`);
        assert.equal(res.statusCode, 200);
        // Read nothing: the daemon has a reader that does not move.
        res.pause();
        await waitFor(
          'the exec to finish',
          async () =>
            (await boxes.getExec<{ status: string }>(box, execId)).status === 'running' ? undefined : true,
          240_000,
        );
        return '';
      },
      async () => {
        // The stalled reader gets everything, in order, once it reads: seq 1…n, then the exit.
        assert.ok(res);
        let buf = '';
        let seq = 0;
        let bytes = 0;
        let exit = false;
        res.setEncoding('utf8');
        res.resume();
        for await (const chunk of res as AsyncIterable<string>) {
          buf += chunk;
          let i = buf.indexOf('\n\n');
          while (i >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const data = /^data: (.*)$/m.exec(block)?.[1] ?? '';
            const ev = JSON.parse(data) as { seq: number; data: string };
            assert.equal(ev.seq, seq + 1, 'events in order, none missing');
            seq = ev.seq;
            if (block.startsWith('event: exit')) exit = true;
            else bytes += ev.data.length;
            i = buf.indexOf('\n\n');
          }
        }
        assert.ok(exit, 'the exit event came last');
        assert.equal(bytes, size);
        await boxWorks();
      },
    );
  });

  test('two viewers that never read while the guest floods its console', async () => {
    const viewers: Client[] = [];
    await abuse(
      'never-reading tty viewers',
      async () => {
        for (let i = 0; i < 2; i++) {
          const v = await open(wsUrl(`/v1/machines/${machine}/tty`));
          // Stop reading: TCP fills, then whatever the daemon queues is the daemon's memory.
          v.ws.pause();
          viewers.push(v);
        }
        // A viewer that reads tells how much the console put out. The guest floods until that is
        // well past the 4 MiB a viewer may fall behind (plus what TCP holds for it), or 90 s.
        const witness = await open(wsUrl(`/v1/machines/${machine}/tty`));
        const stop = new AbortController();
        const flooding = fetch(`${d.url}/v1/machines/${machine}/exec/stream`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ cmd: 'cat /dev/urandom | base64 > /dev/ttyS0', timeout_ms: 120_000 }),
          signal: stop.signal,
        })
          .then((r) => r.text())
          .catch(() => '');
        const t0 = Date.now();
        await until(
          'the console flood',
          () => witness.received() >= 7 * MiB || Date.now() - t0 > 90_000,
          100_000,
        );
        // Closing the stream kills the command.
        stop.abort();
        await flooding;
        witness.ws.terminate();
        return `(${(witness.received() / MiB).toFixed(1)} MiB of console output in ${((Date.now() - t0) / 1000).toFixed(0)} s)`;
      },
      async () => {
        // The daemon let them go: once they read again they find the connection closed (1013;
        // 1006 if the daemon has already given up on its close handshake).
        for (const v of viewers) v.ws.resume();
        const codes = await Promise.race([
          Promise.all(viewers.map((v) => v.closed.then((c) => c.code))),
          sleep(40_000).then(() => undefined),
        ]);
        assert.ok(codes, 'the viewers that fell behind were closed');
        for (const c of codes) assert.ok(c === 1013 || c === 1006, `close code ${c}`);
        await consoleWorks();
      },
    );
  });

  test('buffered execs with large binary output, at the same time', async () => {
    await abuse(
      'concurrent buffered /exec and /v1/run',
      async () => {
        const cmd = 'head -c 32M /dev/urandom; head -c 32M /dev/urandom >&2';
        const replies = await Promise.all([
          postJson({ url: d.url }, `/v1/machines/${machine}/exec`, { cmd, timeout_ms: 120_000 }),
          postJson({ url: d.url }, `/v1/machines/${machine}/exec`, { cmd, timeout_ms: 120_000 }),
          postJson({ socketPath: d.boxesSocket }, '/v1/run', {
            image: 'debian:bookworm',
            cpu: 1,
            memory_mb: 256,
            cmd: ['sh', '-c', cmd],
            timeout_ms: 120_000,
          }),
        ]);
        const [a, b, run] = replies;
        for (const r of [a, b]) {
          assert.equal(r?.status, 200);
          assert.ok(r?.json, `a reply of ${r?.bytes} bytes`);
          assert.deepEqual(Object.keys(r.json).sort(), [
            'duration_ms',
            'exit_code',
            'signal',
            'stderr',
            'stdout',
            'timed_out',
            'truncated',
          ]);
          assert.equal(r.json.exit_code, 0);
          assert.equal(typeof r.json.stdout, 'string');
        }
        assert.equal(run?.status, 200);
        assert.ok(run?.json, `a reply of ${run?.bytes} bytes`);
        assert.equal(run.json.status, 'completed', JSON.stringify(run.json.error_message));
        const cut = [
          a?.json?.truncated === true,
          b?.json?.truncated === true,
          /cut/.test(String(run.json.error_message)),
        ];
        assert.ok(cut.some(Boolean), '3 × 64 MiB at once is over the buffer budget: something was cut');
        return `(replies of ${replies.map((r) => (r.bytes / MiB).toFixed(0)).join(', ')} MiB; cut: ${cut.join(', ')})`;
      },
      machineWorks,
      // The budget held, plus output dropped past it that the GC has not collected yet (the old
      // code grew by over 1.3 GiB here).
      growthBoundMb + 2 * execBufferMb,
    );
  });

  test('a client that never reads its buffered reply gives its share back', async () => {
    await tally.check(
      'stalled /exec replies are cut and their budget freed',
      async () => {
        // Two execs of 32 MiB each (the whole 64 MiB budget), whose replies are never read.
        const body = JSON.stringify({ cmd: 'head -c 32M /dev/zero', timeout_ms: 120_000 });
        const stalled = [0, 1].map(() => {
          const sock = connect(Number(new URL(d.url).port), '127.0.0.1');
          sock.on('error', () => {});
          sock.write(
            `POST /v1/machines/${machine}/exec HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
          );
          sock.pause();
          return { sock, closed: new Promise<void>((r) => sock.once('close', () => r())) };
        });
        const t0 = Date.now();
        await Promise.race([Promise.all(stalled.map((s) => s.closed)), sleep(90_000)]);
        const cutAfter = Date.now() - t0;
        for (const s of stalled) s.sock.destroy();
        // With their shares back, another exec gets its whole 32 MiB.
        const big = await postJson({ url: d.url }, `/v1/machines/${machine}/exec`, {
          cmd: 'head -c 32M /dev/zero',
          timeout_ms: 120_000,
        });
        assert.equal(big.json?.truncated, false, 'the budget is free again');
        return `the stalled replies were cut ${Math.round(cutAfter / 1000)} s after they were asked for`;
      },
      180_000,
    );
  });

  test('tally', () => {
    for (const p of peaks) console.log(`  ${p}`);
    const bugs = bugLines(d.log());
    tally.record('no unhandled error in the daemon log', bugs.length === 0, bugs.join('\n'));
    tally.report();
  });
});
