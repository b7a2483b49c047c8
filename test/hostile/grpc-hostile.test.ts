/**
 * Hostile gRPC clients against a real daemon and a real VM: garbage on the wire, messages over
 * the limit, thousands of streams opened and abandoned, Exec misuse and stdin floods, and
 * unauthenticated calls to every method. For each class the daemon must stay up, answer
 * others, refuse what it must with the right status, and keep its memory bounded.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { type ClientHttp2Session, connect as h2connect } from 'node:http2';
import { connect } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { loadBoxdProto } from '../../src/api/grpc/proto.js';
import { cleanup, sleep, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type BoxdClient, boxdClient, type Msg, rejectsWith, tokenFor } from '../helpers/grpc.js';
import { grpcExec } from '../helpers/grpc-exec.js';
import { bugLines, memoryOf, processAlive, Tally } from '../helpers/hostile.js';

const MiB = 1024 * 1024;
/** What one abuser may grow the daemon's peak RSS by over its RSS just before, MiB. */
const growthBoundMb = 160;

function resetPeak(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

describe('hostile gRPC clients', () => {
  let d: TestDaemon;
  let c: BoxdClient;
  let token: string;
  /** Another user with a VM of their own: what an abuser must not take from others. */
  let bystander: BoxdClient;
  let pid: number;
  const [host, portText] = ['127.0.0.1', ''];
  let port = Number(portText);

  before(async () => {
    d = await startDaemon();
    pid = d.proc.pid as number;
    port = Number((d.grpcAddress as string).split(':').pop());
    token = await tokenFor(d, 'mallory');
    c = boxdClient(d.grpcAddress as string, token);
    const small = { memory_bytes: String(512 * MiB), srf: { auto_suspend_timeout_secs: 0 } };
    await c.call('CreateVm', { name: 'h1', config: small });
    bystander = boxdClient(d.grpcAddress as string, await tokenFor(d, 'trent'));
    await bystander.call('CreateVm', { name: 't1', config: small });
  });

  after(async () => {
    await c.call('DestroyVm', { vm_id: 'h1' }).catch(() => {});
    await bystander.call('DestroyVm', { vm_id: 't1' }).catch(() => {});
    c.close();
    bystander.close();
    await cleanup(d);
  });

  /** The daemon is alive and serves a fresh client (the abuser's user, or the bystander). */
  async function serves(who: 'abuser' | 'bystander' = 'abuser'): Promise<string> {
    assert.ok(processAlive(pid), 'the daemon is alive');
    const fresh = who === 'abuser' ? boxdClient(d.grpcAddress as string, token) : bystander;
    try {
      const r = await grpcExec(fresh, who === 'abuser' ? 'h1' : 't1', 'echo ok').done;
      assert.equal(r.out.toString(), 'ok\n');
      return 'serves';
    } finally {
      if (fresh !== bystander) fresh.close();
    }
  }

  /** Runs an abuser, then checks the daemon's peak RSS grew by at most the bound. */
  async function bounded(
    t: Tally,
    what: string,
    abuse: () => Promise<void>,
    boundMb = growthBoundMb,
  ): Promise<void> {
    const before = memoryOf(pid).rssMb;
    resetPeak(pid);
    await t.check(what, async () => {
      await abuse();
      const grew = memoryOf(pid).peakMb - before;
      console.log(`  ${what}: peak RSS +${grew} MiB (bound ${boundMb})`);
      if (grew > boundMb) throw new Error(`peak RSS grew by ${grew} MiB (bound ${boundMb})`);
      return `+${grew} MiB`;
    });
  }

  test('garbage on the wire', async () => {
    const t = new Tally('grpc garbage');
    const preface = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
    const inputs: [string, Buffer][] = [
      ['random bytes', Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919) % 256))],
      ['HTTP/1.1 request', Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')],
      ['preface then garbage frames', Buffer.concat([preface, Buffer.alloc(9000, 0xff)])],
      // A frame header announcing 16 MiB of payload (over the max frame size), then nothing.
      [
        'oversized frame header',
        Buffer.concat([preface, Buffer.from([0xff, 0xff, 0xff, 0x00, 0, 0, 0, 0, 1])]),
      ],
      ['truncated preface', preface.subarray(0, 10)],
    ];
    for (const [what, bytes] of inputs)
      await t.check(what, async () => {
        const s = connect(port, host);
        s.on('error', () => {});
        s.resume();
        s.write(bytes);
        await sleep(200);
        s.destroy();
        return serves();
      });
    // gRPC framing errors inside a valid HTTP/2 stream: a length prefix longer than the data,
    // a compressed flag without compression, a length over the max message size.
    const frames: [string, Buffer][] = [
      ['length prefix past the data', Buffer.from([0, 0, 0, 1, 0, 1, 2])],
      ['compressed flag, no encoding', Buffer.from([1, 0, 0, 0, 2, 8, 1])],
      ['announced 2 GiB message', Buffer.from([0, 0x7f, 0xff, 0xff, 0xff, 1, 2, 3])],
      ['not protobuf', Buffer.from([0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])],
    ];
    for (const [what, body] of frames)
      await t.check(what, async () => {
        const code = await rawCall(`http://${host}:${port}`, 'GetVm', body, token);
        if (code === '0') throw new Error('accepted');
        await serves();
        return `grpc-status ${code}`;
      });
    t.report();
  });

  test('unauthenticated calls to every method', async () => {
    const t = new Tally('grpc unauthenticated');
    const methods = Object.keys(loadBoxdProto().service);
    for (const m of methods)
      for (const [what, tok] of [
        ['no token', null],
        ['garbage token', 'garbage'],
        ['forged token', 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.'],
      ] as const)
        await t.check(`${m}: ${what}`, async () => {
          if (m === 'Exec') {
            await rejectsWith(grpcExec(c, 'h1', 'true', { token: tok ?? '' }).done, status.UNAUTHENTICATED);
            return 'UNAUTHENTICATED';
          }
          if (m === 'StreamLogs') {
            const s = (c.raw.StreamLogs as (r: Msg, m: unknown) => NodeJS.EventEmitter)(
              { vm_id: 'h1', follow: true },
              c.meta(tok ?? ''),
            );
            await rejectsWith(
              new Promise((resolve, reject) => {
                s.on('data', () => {});
                s.on('end', resolve);
                s.on('error', reject);
              }),
              status.UNAUTHENTICATED,
            );
            return 'UNAUTHENTICATED';
          }
          await rejectsWith(c.call(m, {}, tok), status.UNAUTHENTICATED);
          return 'UNAUTHENTICATED';
        });
    await t.check('still serves', serves);
    t.report();
  });

  test('messages over the limit', async () => {
    const t = new Tally('grpc huge');
    const big = Buffer.alloc(65 * MiB + 1, 1);
    await bounded(t, 'UploadFile of 65 MiB (over 64 MiB + headroom) is refused', async () => {
      const msg = await rejectsWith(
        c.call('UploadFile', { vm_id: 'h1', path: '/tmp/x', data: big }),
        status.RESOURCE_EXHAUSTED,
      );
      assert.match(msg, /larger than max/i);
    });
    await bounded(t, 'the same, unauthenticated, is refused before it is read', async () => {
      await rejectsWith(
        c.call('UploadFile', { vm_id: 'h1', path: '/tmp/x', data: big }, null),
        status.UNAUTHENTICATED,
      );
    });
    // File transfers run at most 2 per user at once: 8 at once get 6 refused. Each admitted one
    // holds its message as received chunks and joined (~2×), plus what the GC has not yet
    // collected: measured ~4× its size at peak, so the bound is 2 × 4 × 64 MiB over the base.
    await bounded(
      t,
      '8 parallel 60 MiB uploads: at most 2 run, the rest RESOURCE_EXHAUSTED',
      async () => {
        const data = Buffer.alloc(60 * MiB, 2);
        const codes = await Promise.all(
          Array.from({ length: 8 }, (_, i) =>
            c.call('UploadFile', { vm_id: 'h1', path: `/root/p${i}`, data }).then(
              () => 'ok',
              (e: { code: number }) => String(e.code),
            ),
          ),
        );
        const ok = codes.filter((x) => x === 'ok').length;
        const refused = codes.filter((x) => x === String(status.RESOURCE_EXHAUSTED)).length;
        if (ok < 1 || refused < 1 || ok + refused !== 8) throw new Error(`answers ${codes.join(',')}`);
        await grpcExec(c, 'h1', 'rm -f /root/p*').done;
      },
      2 * 4 * 64 + growthBoundMb,
    );
    await t.check('still serves', serves);
    t.report();
  });

  test('thousands of streams opened and abandoned', async () => {
    const t = new Tally('grpc streams');
    await bounded(t, '2000 raw HTTP/2 streams that never finish their request, then dropped', async () => {
      const sessions: ClientHttp2Session[] = [];
      try {
        for (let i = 0; i < 20; i++) {
          const s = h2connect(`http://${host}:${port}`);
          s.on('error', () => {});
          sessions.push(s);
          for (let j = 0; j < 100; j++) {
            const r = s.request({
              ':method': 'POST',
              ':path': j % 2 ? '/boxd.api.v1.BoxdApi/GetVm' : '/boxd.api.v1.BoxdApi/Exec',
              'content-type': 'application/grpc',
              te: 'trailers',
              authorization: `Bearer ${token}`,
            });
            r.on('error', () => {});
            r.resume();
            r.write(Buffer.from([0, 0, 0, 0, 10]));
          }
        }
        await sleep(2000);
        // While the abuser holds all it may, another user is served.
        await serves('bystander');
      } finally {
        for (const s of sessions) s.destroy();
      }
    });
    await t.check('the abuser is served again once its streams are gone', () => serves());
    await bounded(
      t,
      '3 connections × 100 Exec streams: past 64 per user refused, others served',
      async () => {
        const clients = [0, 1, 2].map(() => boxdClient(d.grpcAddress as string, token));
        const calls = clients.flatMap((x) =>
          Array.from({ length: 100 }, () => grpcExec(x, 'h1', 'exec sleep 600', { eof: 'none' })),
        );
        try {
          const codes = await Promise.all(
            calls.map((x) =>
              Promise.race([
                x.done.then(() => 'ok').catch((e: { code: number }) => String(e.code)),
                sleep(20_000).then(() => 'open'),
              ]),
            ),
          );
          const refused = codes.filter((x) => x === String(status.RESOURCE_EXHAUSTED)).length;
          const open = codes.filter((x) => x === 'open').length;
          if (refused === 0 || open > 64)
            throw new Error(`${refused} refused, ${open} open: ${[...new Set(codes)].join(',')}`);
          await serves('bystander');
        } finally {
          for (const x of calls) x.call.cancel();
          await Promise.all(calls.map((x) => x.done.catch(() => {})));
          for (const x of clients) x.close();
        }
        // The cancelled commands are killed and the slots come back.
        for (let i = 0; i < 100; i++) {
          const left = (await grpcExec(c, 'h1', 'pgrep -xc sleep || true').done).out.toString().trim();
          if (left === '0') return;
          await sleep(200);
        }
        throw new Error('cancelled commands still run');
      },
    );
    await t.check('slots came back: a new Exec runs', serves);
    t.report();
  });

  test('Exec misuse and floods', async () => {
    const t = new Tally('grpc exec');
    await t.check('first message without vm_id', () =>
      rejectsWith(grpcExec(c, '', 'true').done, status.INVALID_ARGUMENT),
    );
    await t.check('first message without command', () =>
      rejectsWith(grpcExec(c, 'h1', '').done, status.INVALID_ARGUMENT),
    );
    await t.check('stream closed before any message', async () => {
      const call = (c.raw.Exec as (m: unknown) => NodeJS.EventEmitter & { end(): void })(c.meta());
      const done = new Promise((resolve, reject) => {
        call.on('data', () => {});
        call.on('end', resolve);
        call.on('error', reject);
      });
      call.end();
      return rejectsWith(done, status.INVALID_ARGUMENT);
    });
    await bounded(t, 'stdin flood (200 MiB) into a command that never reads it', async () => {
      const x = grpcExec(c, 'h1', 'sleep 600', { eof: 'none' });
      const chunk = Buffer.alloc(MiB, 3);
      let written = 0;
      const t0 = Date.now();
      while (written < 200 * MiB && Date.now() - t0 < 5000) {
        if (!x.call.write({ stdin: true, data: chunk }))
          await Promise.race([sleep(50), new Promise((r) => x.call.once('drain', r))]);
        written += MiB;
      }
      x.call.cancel();
      await x.done.catch(() => {});
    });
    await bounded(t, 'stdin flood (200 MiB) through cat to /dev/null', async () => {
      const x = grpcExec(c, 'h1', 'cat > /dev/null; echo done', { eof: 'none' });
      const chunk = Buffer.alloc(MiB, 4);
      for (let i = 0; i < 200; i++)
        if (!x.call.write({ stdin: true, data: chunk })) await new Promise((r) => x.call.once('drain', r));
      x.call.write({ stdin: true, data: Buffer.alloc(0) });
      const r = await x.done;
      assert.equal(r.out.toString(), 'done\n');
    });
    await bounded(t, 'output flood to a client that stops reading', async () => {
      const x = grpcExec(c, 'h1', 'yes', { eof: 'none' });
      await new Promise((r) => x.call.once('data', r));
      x.call.pause();
      await sleep(5000);
      x.call.cancel();
      await x.done.catch(() => {});
    });
    await t.check('still serves', serves);
    t.report();
  });

  test('afterwards: alive, no bug lines', () => {
    assert.ok(processAlive(pid));
    assert.deepEqual(bugLines(d.log()), []);
  });
});

/** One call over raw HTTP/2 with a hand-made body; the grpc-status it ends with. */
function rawCall(url: string, method: string, body: Buffer, token: string): Promise<string> {
  return new Promise((resolve) => {
    const s = h2connect(url);
    s.on('error', () => resolve('connection error'));
    const r = s.request({
      ':method': 'POST',
      ':path': `/boxd.api.v1.BoxdApi/${method}`,
      'content-type': 'application/grpc',
      te: 'trailers',
      authorization: `Bearer ${token}`,
    });
    let code = 'none';
    r.on('response', (h) => {
      if (h['grpc-status'] !== undefined) code = String(h['grpc-status']);
    });
    r.on('trailers', (h) => {
      code = String(h['grpc-status']);
    });
    r.on('error', () => {});
    r.resume();
    r.on('close', () => {
      s.close();
      resolve(code);
    });
    r.end(body);
  });
}
