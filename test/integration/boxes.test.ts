import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  closeSync,
  createReadStream,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { BoxesClient, readAll, type SseEvent } from '../../src/client/boxes-client.js';
import { ApiError } from '../../src/client/http-client.js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { pushTestImage, startRegistry } from '../helpers/registry.js';

const run = promisify(execFile);

/** curl against the boxes API over its Unix socket: what a user types. */
async function curl(sock: string, args: string[]): Promise<{ status: number; body: string }> {
  const { stdout } = await run('curl', ['-sS', '--unix-socket', sock, '-w', '\n%{http_code}', ...args], {
    maxBuffer: 64 * 1024 * 1024,
  });
  const i = stdout.lastIndexOf('\n');
  return { status: Number(stdout.slice(i + 1)), body: stdout.slice(0, i) };
}

async function rejects(p: Promise<unknown>, status: number, code: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof ApiError, String(e));
    assert.equal(e.code, code, e.message);
    assert.equal(e.status, status, e.message);
    assert.ok(e.message.length > 0);
    return true;
  });
}

async function collect(c: BoxesClient, box: string, eid: string): Promise<SseEvent[]> {
  const out: SseEvent[] = [];
  for await (const e of c.events(box, eid)) out.push(e);
  return out;
}

function stdoutOf(events: SseEvent[], stream: 'stdout' | 'stderr' = 'stdout'): Buffer {
  return Buffer.concat(
    events
      .filter((e) => e.event === 'log' && e.data.stream === stream)
      .map((e) => Buffer.from(e.data.data, e.data.encoding === 'base64' ? 'base64' : 'utf8')),
  );
}

const small = { cpu: 1, memory_mb: 256 };

describe('boxes API', { timeout: 600_000 }, () => {
  let d: TestDaemon;
  let c: BoxesClient;
  let tcp: BoxesClient;

  before(async () => {
    d = await startDaemon({ env: { HUTCH_BOXES_LISTEN: '127.0.0.1:0' } });
    c = new BoxesClient({ socketPath: d.boxesSocket });
    assert.ok(d.boxesUrl, `no TCP endpoint in the daemon log:\n${d.log()}`);
    tcp = new BoxesClient({ url: d.boxesUrl });
  });
  after(async () => {
    await cleanup(d);
  });

  test('the socket is owner-only and serves /v1/info with the real limits', async () => {
    assert.equal(statSync(d.boxesSocket).mode & 0o777, 0o600);
    const info = await c.info<{ max_cpu: number; max_memory_mb: number }>();
    assert.ok(info.max_cpu >= 1 && info.max_memory_mb >= 128, JSON.stringify(info));
    const viaCurl = await curl(d.boxesSocket, ['http://boxrun/v1/info']);
    assert.equal(viaCurl.status, 200);
    assert.deepEqual(JSON.parse(viaCurl.body), info);
    assert.deepEqual(await tcp.info(), info);
    // Over the limits: refused with the limit named, nothing created.
    await rejects(c.create({ image: 'debian:bookworm', cpu: info.max_cpu + 1 }), 400, 'LIMIT_EXCEEDED');
    await rejects(
      c.create({ image: 'debian:bookworm', memory_mb: info.max_memory_mb + 1 }),
      400,
      'LIMIT_EXCEEDED',
    );
    assert.equal((await c.list()).boxes.length, 0);
  });

  test('create with the defaults of the spec, get by id and name, list by status', async () => {
    const r = await curl(d.boxesSocket, [
      '-X',
      'POST',
      'http://boxrun/v1/boxes',
      '-H',
      'content-type: application/json',
      '-d',
      JSON.stringify({ image: 'debian:bookworm', name: 'dev' }),
    ]);
    assert.equal(r.status, 201, r.body);
    const box = JSON.parse(r.body) as Record<string, unknown>;
    assert.match(String(box.id), /^box_[0-9a-f]{12}$/);
    assert.equal(box.name, 'dev');
    assert.equal(box.status, 'running');
    assert.equal(box.image, 'debian:bookworm');
    assert.equal(box.cpu, 2);
    assert.equal(box.memory_mb, 1024);
    assert.equal(box.disk_size_gb, 8);
    assert.equal(box.network, false);
    assert.equal(box.workdir, '/root');
    assert.equal(box.env, null);
    assert.equal(box.volumes, null);
    assert.match(String(box.created_at), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    assert.match(String(box.started_at), /Z$/);
    assert.equal(box.stopped_at, null);
    assert.deepEqual((await c.get('dev')).id, box.id);
    assert.deepEqual((await tcp.get(String(box.id))).name, 'dev');
    // The guest really has what was asked for.
    const e = await c.exec<{ id: string }>('dev', {
      cmd: ['sh', '-c', 'nproc; grep MemTotal /proc/meminfo'],
    });
    const out = stdoutOf(await collect(c, 'dev', e.id)).toString();
    assert.match(out, /^2\n/);
    const kb = Number(/MemTotal:\s+(\d+)/.exec(out)?.[1]);
    assert.ok(kb > 900 * 1024 && kb <= 1024 * 1024, out);
    await rejects(c.create({ image: 'debian:bookworm', name: 'dev', ...small }), 409, 'NAME_TAKEN');
    assert.equal((await c.list('running')).boxes.length, 1);
    assert.equal((await c.list('stopped')).boxes.length, 0);
    await c.remove('dev', true);
    await rejects(c.get('dev'), 404, 'BOX_NOT_FOUND');
  });

  test('exec: env and workdir of the box apply, SSE replays from the start, timeout and cancel', async () => {
    const box = await c.create<{ id: string }>({
      image: 'debian:bookworm',
      ...small,
      env: { GREETING: 'hello', WHO: 'box' },
      workdir: '/tmp',
    });
    const e = await c.exec<Record<string, unknown>>(box.id, {
      cmd: ['sh', '-c', 'echo "$GREETING $WHO"; pwd; echo err >&2; exit 3'],
      env: { WHO: 'exec' },
    });
    assert.match(String(e.id), /^exec_[0-9a-f]{12}$/);
    assert.equal(e.box_id, box.id);
    assert.equal(e.status, 'running');
    assert.deepEqual(e.cmd, ['sh', '-c', 'echo "$GREETING $WHO"; pwd; echo err >&2; exit 3']);
    assert.equal(e.exit_code, null);
    const events = await collect(c, box.id, String(e.id));
    assert.equal(stdoutOf(events).toString(), 'hello exec\n/tmp\n');
    assert.equal(stdoutOf(events, 'stderr').toString(), 'err\n');
    const last = events.at(-1);
    assert.equal(last?.event, 'exit');
    assert.equal(last?.data.stream, null);
    assert.equal((JSON.parse(last?.data.data ?? '{}') as { exit_code: number }).exit_code, 3);
    assert.deepEqual(
      events.map((x) => x.data.seq),
      events.map((_, i) => i + 1),
    );
    const done = await c.getExec<Record<string, unknown>>(box.id, String(e.id));
    assert.equal(done.status, 'completed');
    assert.equal(done.exit_code, 3);
    assert.match(String(done.finished_at), /Z$/);
    // A reader that comes back later gets it all again, identically.
    assert.deepEqual(await collect(tcp, box.id, String(e.id)), events);

    // Live: a reader connected while the command runs, another that reconnects midway.
    const slow = await c.exec<{ id: string }>(box.id, {
      cmd: ['sh', '-c', 'for i in 1 2 3 4 5 6; do echo line $i; sleep 0.3; done'],
    });
    const firstTwo: SseEvent[] = [];
    for await (const ev of c.events(box.id, slow.id)) {
      firstTwo.push(ev);
      if (firstTwo.length === 2) break; // disconnect midway
    }
    const all = await collect(c, box.id, slow.id);
    assert.deepEqual(all.slice(0, 2), firstTwo);
    assert.equal(stdoutOf(all).toString(), [1, 2, 3, 4, 5, 6].map((i) => `line ${i}\n`).join(''));
    assert.deepEqual(
      all.map((x) => x.data.seq),
      all.map((_, i) => i + 1),
    );

    // Binary output and output far over one frame arrive exactly.
    const bin = await c.exec<{ id: string }>(box.id, {
      cmd: ['sh', '-c', 'head -c 3000000 /dev/urandom | tee /tmp/r.bin | sha256sum >&2; cat /tmp/r.bin'],
    });
    const binEvents = await collect(c, box.id, bin.id);
    const bytes = stdoutOf(binEvents);
    assert.equal(bytes.length, 3_000_000);
    assert.equal(
      createHash('sha256').update(bytes).digest('hex'),
      stdoutOf(binEvents, 'stderr').toString().split(' ')[0],
    );
    assert.ok(binEvents.some((x) => x.data.encoding === 'base64'));
    // UTF-8 split across chunks is never cut: every text event is whole characters.
    const utf = await c.exec<{ id: string }>(box.id, {
      cmd: ['sh', '-c', 'for i in $(seq 1 20000); do printf "é€😀"; done'],
    });
    const utfEvents = await collect(c, box.id, utf.id);
    assert.ok(utfEvents.filter((x) => x.event === 'log').every((x) => x.data.encoding === undefined));
    assert.equal(stdoutOf(utfEvents).toString(), 'é€😀'.repeat(20000));

    const t = await c.exec<{ id: string }>(box.id, { cmd: ['sleep', '30'], timeout_ms: 500 });
    const tEvents = await collect(c, box.id, t.id);
    assert.equal((JSON.parse(tEvents.at(-1)?.data.data ?? '{}') as { status: string }).status, 'timed_out');
    assert.equal((await c.getExec<{ status: string }>(box.id, t.id)).status, 'timed_out');

    const k = await c.exec<{ id: string }>(box.id, { cmd: ['sleep', '60'] });
    const cancelled = await c.cancel<{ status: string }>(box.id, k.id);
    assert.equal(cancelled.status, 'cancelled');
    assert.equal((await collect(c, box.id, k.id)).at(-1)?.event, 'exit');
    // Cancelling a finished exec changes nothing.
    assert.equal((await c.cancel<{ status: string }>(box.id, e.id as string)).status, 'completed');

    const list = await c.execs<{ execs: { id: string }[] }>(box.id);
    assert.deepEqual(
      list.execs.map((x) => x.id),
      [e.id, slow.id, bin.id, utf.id, t.id, k.id],
    );
    await rejects(c.exec(box.id, { cmd: ['/no/such/program'] }), 422, 'EXEC_FAILED');
    await rejects(c.getExec(box.id, 'exec_000000000000'), 404, 'EXEC_NOT_FOUND');
    await rejects(c.exec(box.id, { cmd: 'echo hi' }), 400, 'INVALID_ARGUMENT');
    await rejects(c.exec(box.id, { cmd: ['true'], timeout_ms: 'soon' }), 400, 'INVALID_ARGUMENT');
    assert.equal((await c.execs<{ execs: unknown[] }>(box.id)).execs.length, 6);
    await c.remove(box.id, true);
  });

  test('curl: exec + events, upload + download, run, gc', async () => {
    const sock = d.boxesSocket;
    const created = await curl(sock, [
      '-X',
      'POST',
      'http://boxrun/v1/boxes',
      '-d',
      JSON.stringify({ image: 'debian:bookworm', name: 'curly', ...small }),
    ]);
    assert.equal(created.status, 201, created.body);
    const ex = await curl(sock, [
      '-X',
      'POST',
      'http://boxrun/v1/boxes/curly/exec',
      '-d',
      JSON.stringify({ cmd: ['echo', 'hello'] }),
    ]);
    assert.equal(ex.status, 201, ex.body);
    const eid = (JSON.parse(ex.body) as { id: string }).id;
    const sse = await curl(sock, ['-N', `http://boxrun/v1/boxes/curly/exec/${eid}/events`]);
    assert.equal(sse.status, 200);
    assert.match(sse.body, /^event: log\ndata: \{"stream":"stdout","data":"hello\\n","seq":1\}\n\n/);
    assert.match(
      sse.body,
      /event: exit\ndata: \{"stream":null,"data":"\{\\"exit_code\\":0[^\n]*"seq":2\}\n\n$/,
    );

    const file = join(d.stateDir, 'data.csv');
    const content = randomBytes(200_000);
    writeFileSync(file, content);
    const up = await curl(sock, [
      '-F',
      `file=@${file}`,
      '-F',
      'dest=/root/in/data.csv',
      'http://boxrun/v1/boxes/curly/files/upload',
    ]);
    assert.equal(up.status, 200, up.body);
    assert.deepEqual(JSON.parse(up.body), { ok: true, dest: '/root/in/data.csv', size: 200_000 });
    const out = join(d.stateDir, 'back.csv');
    const down = await curl(sock, [
      '-o',
      out,
      '-X',
      'POST',
      'http://boxrun/v1/boxes/curly/files/download',
      '-d',
      '{"path":"/root/in/data.csv"}',
    ]);
    assert.equal(down.status, 200);
    const { stdout: sum } = await run('sha256sum', [out]);
    assert.equal(sum.split(' ')[0], createHash('sha256').update(content).digest('hex'));

    const runR = await curl(sock, [
      '-X',
      'POST',
      'http://boxrun/v1/run',
      '-d',
      JSON.stringify({
        image: 'debian:bookworm',
        cmd: ['sh', '-c', 'echo hi; echo oops >&2; exit 4'],
        ...small,
      }),
    ]);
    assert.equal(runR.status, 200, runR.body);
    assert.deepEqual(JSON.parse(runR.body), {
      exit_code: 4,
      stdout: 'hi\n',
      stderr: 'oops\n',
      error_message: null,
      status: 'completed',
      signal: null,
    });
    // The ephemeral box is gone.
    assert.equal((await c.list()).boxes.length, 1);

    const stop = await curl(sock, ['-X', 'POST', 'http://boxrun/v1/boxes/curly:stop']);
    assert.equal(stop.status, 200, stop.body);
    assert.equal((JSON.parse(stop.body) as { status: string }).status, 'stopped');
    const gcYoung = await curl(sock, ['-X', 'POST', 'http://boxrun/v1/gc', '-d', '{"older_than":3600}']);
    assert.equal((JSON.parse(gcYoung.body) as { removed: number }).removed, 0);
    const gc = await curl(sock, ['-X', 'POST', 'http://boxrun/v1/gc', '-d', '{"older_than":0}']);
    assert.equal(gc.status, 200);
    assert.equal((JSON.parse(gc.body) as { removed: number }).removed, 1);
    assert.equal((await c.list()).boxes.length, 0);
  });

  test('stop keeps the disk, start brings the box back with its files; remove needs force while running', async () => {
    const box = await c.create<{ id: string }>({ image: 'debian:bookworm', name: 'keeper', ...small });
    await c.upload(box.id, '/root/notes/', Buffer.from('kept across stop\n'), 'a.txt');
    const w = await c.exec<{ id: string }>(box.id, { cmd: ['sh', '-c', 'echo written > /root/b.txt'] });
    await collect(c, box.id, w.id);
    await rejects(c.remove(box.id), 409, 'BOX_RUNNING');
    const stopped = await c.stop<Record<string, unknown>>(box.id);
    assert.equal(stopped.status, 'stopped');
    assert.match(String(stopped.stopped_at), /Z$/);
    assert.equal((await c.list('stopped')).boxes.length, 1);
    await rejects(c.exec(box.id, { cmd: ['true'] }), 409, 'BOX_NOT_RUNNING');
    // A stopped box can't be asked to stop again into a different state; it stays stopped.
    assert.equal((await c.stop<{ status: string }>(box.id)).status, 'stopped');
    const started = await c.start<Record<string, unknown>>('keeper');
    assert.equal(started.status, 'running');
    assert.equal(started.stopped_at, null);
    const r = await c.exec<{ id: string }>(box.id, { cmd: ['cat', '/root/notes/a.txt', '/root/b.txt'] });
    assert.equal(stdoutOf(await collect(c, box.id, r.id)).toString(), 'kept across stop\nwritten\n');
    await c.stop(box.id);
    await c.remove(box.id);
    await rejects(c.get(box.id), 404, 'BOX_NOT_FOUND');
  });

  test('files: large upload and download stream through the agent; bad input changes nothing', async () => {
    const box = await c.create<{ id: string }>({ image: 'debian:bookworm', ...small });
    // 100 MB streamed from a file on the host, checked in the guest, back through curl and TCP.
    const bigFile = join(d.stateDir, 'big.bin');
    const hash = createHash('sha256');
    const fd = openSync(bigFile, 'w');
    for (let i = 0; i < 100; i++) {
      const chunk = randomBytes(1024 * 1024);
      hash.update(chunk);
      writeSync(fd, chunk);
    }
    closeSync(fd);
    const sum = hash.digest('hex');
    const up = await c.upload(box.id, '/root/big.bin', createReadStream(bigFile), 'big.bin');
    assert.equal(up.size, 100 * 1024 * 1024);
    const inGuest = await c.exec<{ id: string }>(box.id, { cmd: ['sha256sum', '/root/big.bin'] });
    assert.equal(
      stdoutOf(await collect(c, box.id, inGuest.id))
        .toString()
        .split(' ')[0],
      sum,
    );
    const viaCurl = join(d.stateDir, 'big.back');
    const got = await curl(d.boxesSocket, [
      '-o',
      viaCurl,
      '-X',
      'POST',
      `http://boxrun/v1/boxes/${box.id}/files/download`,
      '-d',
      '{"path":"/root/big.bin"}',
    ]);
    assert.equal(got.status, 200);
    assert.equal((await run('sha256sum', [viaCurl])).stdout.split(' ')[0], sum);
    const back = await readAll(await tcp.download(box.id, '/root/big.bin'));
    assert.equal(createHash('sha256').update(back).digest('hex'), sum);
    rmSync(viaCurl);
    rmSync(bigFile);
    await rejects(c.download(box.id, '/root/nope'), 404, 'FILE_NOT_FOUND');
    await rejects(c.download(box.id, '/root'), 409, 'NOT_A_FILE');
    await rejects(c.download(box.id, 'relative'), 400, 'INVALID_ARGUMENT');
    await rejects(c.upload(box.id, '/root/../etc/passwd', Buffer.from('x')), 400, 'INVALID_ARGUMENT');
    await rejects(c.upload('box_000000000000', '/root/x', Buffer.from('x')), 404, 'BOX_NOT_FOUND');
    const bad = await curl(d.boxesSocket, [
      '-X',
      'POST',
      '-H',
      'content-type: multipart/form-data; boundary=zzz',
      '--data-binary',
      'this is not multipart',
      `http://boxrun/v1/boxes/${box.id}/files/upload`,
    ]);
    assert.equal(bad.status, 400, bad.body);
    assert.equal((JSON.parse(bad.body) as { code: string }).code, 'INVALID_ARGUMENT');
    const noDest = await curl(d.boxesSocket, [
      '-F',
      `file=@${join(d.stateDir, 'data.csv')}`,
      `http://boxrun/v1/boxes/${box.id}/files/upload`,
    ]);
    assert.equal(noDest.status, 400);
    const ls = await c.exec<{ id: string }>(box.id, { cmd: ['ls', '/root'] });
    assert.equal(stdoutOf(await collect(c, box.id, ls.id)).toString(), 'big.bin\n');
    await c.remove(box.id, true);
  });

  test('every endpoint answers over TCP as over the socket', async () => {
    const box = await tcp.create<{ id: string }>({ image: 'debian:bookworm', name: 'tcp', ...small });
    assert.equal((await tcp.list<{ boxes: { id: string }[] }>('running')).boxes[0]?.id, box.id);
    assert.equal((await tcp.get<{ name: string }>('tcp')).name, 'tcp');
    const e = await tcp.exec<{ id: string }>('tcp', { cmd: ['sleep', '60'] });
    assert.equal((await tcp.getExec<{ status: string }>('tcp', e.id)).status, 'running');
    assert.equal((await tcp.execs<{ execs: unknown[] }>('tcp')).execs.length, 1);
    assert.equal((await tcp.cancel<{ status: string }>('tcp', e.id)).status, 'cancelled');
    assert.equal((await collect(tcp, 'tcp', e.id)).at(-1)?.event, 'exit');
    await tcp.upload('tcp', '/root/t.txt', Buffer.from('over tcp\n'));
    assert.equal((await readAll(await tcp.download('tcp', '/root/t.txt'))).toString(), 'over tcp\n');
    const ws = tcp.attach('tcp', { cols: 90 });
    const code = await new Promise<number>((resolve, reject) => {
      ws.on('message', (data, isBinary) => {
        if (!isBinary) resolve((JSON.parse(String(data)) as { code: number }).code);
      });
      ws.on('open', () => ws.send(Buffer.from('exit 5\n')));
      ws.on('error', reject);
    });
    assert.equal(code, 5);
    assert.equal((await tcp.stop<{ status: string }>('tcp')).status, 'stopped');
    assert.equal((await tcp.start<{ status: string }>('tcp')).status, 'running');
    await tcp.remove('tcp', true);
    const r = await tcp.run<{ exit_code: number; stdout: string }>({
      image: 'debian:bookworm',
      cmd: ['echo', 'ran'],
      ...small,
    });
    assert.deepEqual([r.exit_code, r.stdout], [0, 'ran\n']);
    const slow = await tcp.run<{ status: string; exit_code: number | null; error_message: string }>({
      image: 'debian:bookworm',
      cmd: ['sleep', '30'],
      timeout_ms: 300,
      ...small,
    });
    assert.equal(slow.status, 'timed_out');
    assert.equal(slow.exit_code, null);
    assert.match(slow.error_message, /timeout/);
    assert.deepEqual(await tcp.gc(), { removed: 0, ids: [] });
    assert.equal((await tcp.list()).boxes.length, 0);
  });

  test('bad input gets the error format and changes nothing', async () => {
    const cases: [string, string, string | undefined, number, string][] = [
      ['POST', '/v1/boxes', '{"image":', 400, 'INVALID_JSON'],
      ['POST', '/v1/boxes', '{}', 400, 'INVALID_ARGUMENT'],
      ['POST', '/v1/boxes', '{"image":"debian:bookworm","cpu":"two"}', 400, 'INVALID_ARGUMENT'],
      ['POST', '/v1/boxes', '{"image":"debian:bookworm","bogus":1}', 400, 'INVALID_ARGUMENT'],
      ['POST', '/v1/boxes', '{"image":"debian:bookworm","workdir":"../x"}', 400, 'INVALID_ARGUMENT'],
      [
        'POST',
        '/v1/boxes',
        '{"image":"debian:bookworm","egress":{"deny":["10.0.0.0/8"]}}',
        400,
        'INVALID_ARGUMENT',
      ],
      [
        'POST',
        '/v1/boxes',
        '{"image":"debian:bookworm","network":true,"egress":{"allow":[1]}}',
        400,
        'INVALID_ARGUMENT',
      ],
      [
        'POST',
        '/v1/boxes',
        '{"image":"debian:bookworm","network":true,"network_id":"nope"}',
        404,
        'NETWORK_NOT_FOUND',
      ],
      ['POST', '/v1/boxes', `{"image":"${'x'.repeat(2 * 1024 * 1024)}"}`, 413, 'BODY_TOO_LARGE'],
      [
        'POST',
        '/v1/boxes',
        '{"image":"debian:bookworm","volumes":[{"host_path":"/etc","guest_path":"/mnt"}]}',
        403,
        'VOLUME_NOT_ALLOWED',
      ],
      ['GET', '/v1/boxes/box_000000000000', undefined, 404, 'BOX_NOT_FOUND'],
      ['GET', '/v1/boxes?status=sleeping', undefined, 400, 'INVALID_ARGUMENT'],
      ['POST', '/v1/boxes/box_000000000000:stop', undefined, 404, 'BOX_NOT_FOUND'],
      ['DELETE', '/v1/boxes/box_000000000000', undefined, 404, 'BOX_NOT_FOUND'],
      ['POST', '/v1/boxes/box_000000000000/exec', '{"cmd":["true"]}', 404, 'BOX_NOT_FOUND'],
      ['GET', '/v1/boxes/box_000000000000/exec/exec_1/events', undefined, 404, 'BOX_NOT_FOUND'],
      ['POST', '/v1/gc', '{"older_than":-1}', 400, 'INVALID_ARGUMENT'],
      ['POST', '/v1/run', '{"image":"debian:bookworm"}', 400, 'INVALID_ARGUMENT'],
      ['PUT', '/v1/boxes', '{}', 405, 'METHOD_NOT_ALLOWED'],
      ['GET', '/v1/nothing', undefined, 404, 'ROUTE_NOT_FOUND'],
    ];
    for (const [method, path, body, status, code] of cases) {
      const tmp = join(d.stateDir, 'body.json');
      writeFileSync(tmp, body ?? '');
      const r = await curl(d.boxesSocket, [
        '-X',
        method,
        ...(body !== undefined ? ['-H', 'content-type: application/json', '--data-binary', `@${tmp}`] : []),
        `http://boxrun${path}`,
      ]);
      assert.equal(r.status, status, `${method} ${path}: ${r.body}`);
      const e = JSON.parse(r.body) as { code: string; message: string };
      assert.equal(e.code, code, `${method} ${path}: ${r.body}`);
      assert.ok(e.message.length > 0);
    }
    assert.equal((await c.list()).boxes.length, 0);
  });
});

describe('boxes across faults', { timeout: 600_000 }, () => {
  test('a daemon restart keeps boxes; a running exec ends as failed; a killed VM leaves the box stopped with its disk', async () => {
    let d = await startDaemon();
    const stateDir = d.stateDir;
    try {
      let c = new BoxesClient({ socketPath: d.boxesSocket });
      const a = await c.create<{ id: string }>({ image: 'debian:bookworm', name: 'a', ...small });
      const b = await c.create<{ id: string }>({ image: 'debian:bookworm', name: 'b', ...small });
      await c.upload(b.id, '/root/keep.txt', Buffer.from('still here\n'));
      await c.stop(b.id);
      const long = await c.exec<{ id: string }>(a.id, { cmd: ['sh', '-c', 'echo started; sleep 100'] });
      for await (const e of c.events(a.id, long.id)) if (e.event === 'log') break;
      await d.stop('SIGKILL');

      d = await startDaemon({ stateDir });
      c = new BoxesClient({ socketPath: d.boxesSocket });
      assert.equal((await c.get<{ status: string }>('a')).status, 'running');
      assert.equal((await c.get<{ status: string }>('b')).status, 'stopped');
      const ended = await c.getExec<{ status: string; error: string }>(a.id, long.id);
      assert.equal(ended.status, 'failed');
      assert.match(ended.error, /restart/);
      const events = await collect(c, a.id, long.id);
      assert.equal(stdoutOf(events).toString(), 'started\n');
      assert.equal(events.at(-1)?.event, 'exit');
      const ok = await c.exec<{ id: string }>(a.id, { cmd: ['echo', 'adopted'] });
      assert.equal(stdoutOf(await collect(c, a.id, ok.id)).toString(), 'adopted\n');

      // The VM dies under a running box: the box is stopped, with the reason, and its disk.
      await c.start(b.id);
      const pid = Number(readFileSync(join(stateDir, 'run', b.id, 'qemu.pid'), 'utf8'));
      process.kill(pid, 'SIGKILL');
      const deadline = Date.now() + 10_000;
      let st = '';
      while (Date.now() < deadline) {
        st = (await c.get<{ status: string }>(b.id)).status;
        if (st === 'stopped') break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const failed = await c.get<{ status: string; error: string | null }>(b.id);
      assert.equal(failed.status, 'stopped');
      assert.match(String(failed.error), /qemu exited/);
      await c.start(b.id);
      const cat = await c.exec<{ id: string }>(b.id, { cmd: ['cat', '/root/keep.txt'] });
      assert.equal(stdoutOf(await collect(c, b.id, cat.id)).toString(), 'still here\n');
    } finally {
      await cleanup(d);
    }
  });
});

describe('box exec logs are bounded', { timeout: 600_000 }, () => {
  test('a flood of output past the log cap is dropped, the command still finishes, the stream says so', async () => {
    const d = await startDaemon({ env: { HUTCH_EXEC_LOG_MAX_BYTES: String(256 * 1024) } });
    try {
      const c = new BoxesClient({ socketPath: d.boxesSocket });
      const box = await c.create<{ id: string }>({ image: 'debian:bookworm', ...small });
      const e = await c.exec<{ id: string }>(box.id, {
        cmd: ['sh', '-c', 'head -c 20000000 /dev/zero | tr "\\0" a; echo; echo done >&2'],
      });
      const events = await collect(c, box.id, e.id);
      const exit = JSON.parse(events.at(-1)?.data.data ?? '{}') as { exit_code: number; truncated?: boolean };
      assert.equal(exit.exit_code, 0);
      assert.equal(exit.truncated, true);
      const kept = stdoutOf(events).length;
      assert.ok(kept > 100_000 && kept < 256 * 1024, `kept ${kept} bytes`);
      assert.deepEqual(await collect(c, box.id, e.id), events);
    } finally {
      await cleanup(d);
    }
  });
});

describe('boxes from an OCI registry', { timeout: 600_000 }, () => {
  test('an image pushed to a local registry boots as a box with its layers, Env and WorkingDir', async () => {
    const reg = await startRegistry();
    const d = await startDaemon();
    try {
      const c = new BoxesClient({ socketPath: d.boxesSocket });
      await pushTestImage(
        `docker://${reg.host}/team/app:1`,
        [
          { files: { 'etc/app.conf': 'mode=one\n', 'opt/old.txt': 'deleted by the next layer\n' } },
          { whiteouts: ['opt/old.txt'], dirs: ['srv/app'], files: { 'srv/app/hello.txt': 'hello\n' } },
        ],
        { env: ['APP_MODE=registry', 'PATH=/bin:/usr/bin'], workdir: '/srv/app' },
      );
      const ref = `${reg.host}/team/app:1`;
      const box = await c.create<Record<string, unknown>>({ image: ref, env: { EXTRA: 'x' }, ...small });
      assert.equal(box.image, ref);
      assert.equal(box.workdir, '/srv/app');
      assert.match(String(box.digest), /^sha256:[0-9a-f]{64}$/);
      const id = String(box.id);
      const out = await c.exec<{ id: string }>(id, {
        cmd: [
          'sh',
          '-c',
          'echo $APP_MODE $EXTRA; pwd; cat hello.txt /etc/app.conf; ls /opt; cat /proc/1/comm',
        ],
      });
      assert.equal(
        stdoutOf(await collect(c, id, out.id)).toString(),
        'registry x\n/srv/app\nhello\nmode=one\nhutch-agent\n',
      );
      // No bash in this image: attach falls back to /bin/sh.
      const ws = c.attach(id, { cols: 100, rows: 30 });
      const seen: Buffer[] = [];
      const exit = new Promise<number>((resolve, reject) => {
        ws.on('message', (data, isBinary) => {
          if (isBinary) seen.push(data as Buffer);
          else {
            const m = JSON.parse(String(data)) as { type: string; code: number };
            if (m.type === 'exit') resolve(m.code);
          }
        });
        ws.on('error', reject);
      });
      await new Promise((r) => ws.once('open', r));
      ws.send(Buffer.from('echo shell=$0; exit 7\n'));
      assert.equal(await exit, 7);
      assert.match(Buffer.concat(seen).toString(), /shell=\/bin\/sh/);
      await c.remove(id, true);
      // A tag the registry doesn't have; a registry that isn't there.
      await rejects(c.create({ image: `${reg.host}/team/app:nope`, ...small }), 404, 'IMAGE_NOT_FOUND');
      await rejects(c.create({ image: '127.0.0.1:1/team/app:1', ...small }), 502, 'IMAGE_PULL_FAILED');
      assert.equal((await c.list()).boxes.length, 0);
    } finally {
      await cleanup(d);
      await reg.stop();
    }
  });
});

describe('box volumes', { timeout: 600_000 }, () => {
  test('host directories inside the allowed roots are shared; readonly is enforced; others are refused', async () => {
    const roots = mkdtempSync(join(tmpdir(), 'hutch-vols-'));
    chmodSync(roots, 0o755);
    const vm = readFileSync('/etc/passwd', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('hutch-vm:'))
      ?.split(':');
    const own = (p: string): void => {
      if (vm) chownSync(p, Number(vm[2]), Number(vm[3]));
    };
    const rw = join(roots, 'rw');
    const ro = join(roots, 'ro');
    for (const p of [rw, ro]) {
      mkdirSync(p);
      own(p);
    }
    writeFileSync(join(rw, 'from-host.txt'), 'host wrote this\n');
    writeFileSync(join(ro, 'fixed.txt'), 'read only\n');
    own(join(rw, 'from-host.txt'));
    own(join(ro, 'fixed.txt'));
    symlinkSync('/etc', join(roots, 'sneaky'));
    const d = await startDaemon({ env: { HUTCH_VOLUME_ROOTS: roots } });
    try {
      const c = new BoxesClient({ socketPath: d.boxesSocket });
      assert.deepEqual((await c.info<{ volume_roots: string[] }>()).volume_roots, [roots]);
      const box = await c.create<{ id: string; volumes: unknown }>({
        image: 'debian:bookworm',
        ...small,
        volumes: [
          { host_path: rw, guest_path: '/root/src' },
          { host_path: ro, guest_path: '/mnt/data files', readonly: true },
        ],
      });
      assert.deepEqual(box.volumes, [
        { host_path: rw, guest_path: '/root/src', readonly: false },
        { host_path: ro, guest_path: '/mnt/data files', readonly: true },
      ]);
      const e = await c.exec<{ id: string }>(box.id, {
        cmd: [
          'sh',
          '-c',
          'cat /root/src/from-host.txt "/mnt/data files/fixed.txt"; echo guest wrote this > /root/src/from-guest.txt; ' +
            'echo x > "/mnt/data files/new.txt" 2>/dev/null && echo WROTE || echo refused; ' +
            'mount -o remount,rw "/mnt/data files" 2>/dev/null; echo y > "/mnt/data files/new2.txt" 2>/dev/null || echo refused again',
        ],
      });
      assert.equal(
        stdoutOf(await collect(c, box.id, e.id)).toString(),
        'host wrote this\nread only\nrefused\nrefused again\n',
      );
      assert.equal(readFileSync(join(rw, 'from-guest.txt'), 'utf8'), 'guest wrote this\n');
      assert.deepEqual(readdirSync(ro), ['fixed.txt']);
      await rejects(
        c.create({
          image: 'debian:bookworm',
          ...small,
          volumes: [{ host_path: join(roots, 'sneaky'), guest_path: '/x' }],
        }),
        403,
        'VOLUME_NOT_ALLOWED',
      );
      await rejects(
        c.create({ image: 'debian:bookworm', ...small, volumes: [{ host_path: rw, guest_path: '/proc/x' }] }),
        400,
        'INVALID_ARGUMENT',
      );
      // A directory the VM user may not open: a clear boot failure, nothing left behind.
      const closed = join(roots, 'closed');
      mkdirSync(closed, { mode: 0o700 });
      await rejects(
        c.create({
          image: 'debian:bookworm',
          ...small,
          volumes: [{ host_path: closed, guest_path: '/mnt/c' }],
        }),
        500,
        'BOOT_FAILED',
      );
      assert.equal((await c.list()).boxes.length, 1);
      // Volumes come back when a stopped box starts again.
      await c.stop(box.id);
      writeFileSync(join(rw, 'later.txt'), 'after the restart\n');
      await c.start(box.id);
      const again = await c.exec<{ id: string }>(box.id, { cmd: ['cat', '/root/src/later.txt'] });
      assert.equal(stdoutOf(await collect(c, box.id, again.id)).toString(), 'after the restart\n');
    } finally {
      await cleanup(d);
      rmSync(roots, { recursive: true, force: true });
    }
  });
});

describe('box snapshots', { timeout: 600_000 }, () => {
  test('boxes of an image and size restore from its snapshot once it exists, each its own machine', async () => {
    // Volumes do not force a cold boot: the snapshot's placeholders are swapped for them.
    const roots = mkdtempSync(join(tmpdir(), 'hutch-snapvols-'));
    chmodSync(roots, 0o755);
    mkdirSync(join(roots, 'data'), { mode: 0o755 });
    writeFileSync(join(roots, 'data', 'shared.txt'), 'from the host\n', { mode: 0o644 });
    const d = await startDaemon({ env: { HUTCH_VOLUME_ROOTS: roots } });
    try {
      const c = new BoxesClient({ socketPath: d.boxesSocket });
      const size = { cpu: 1, memory_mb: 320 };
      const first = await c.create<{ id: string; mode: string }>({ image: 'debian:bookworm', ...size });
      assert.equal(first.mode, 'cold');
      // The first create starts the snapshot; later ones restore from it.
      let snap: { id: string; mode: string; boot_ms: number } | undefined;
      const deadline = Date.now() + 120_000;
      while (!snap && Date.now() < deadline) {
        const b = await c.create<{ id: string; mode: string; boot_ms: number }>({
          image: 'debian:bookworm',
          ...size,
          disk_size_gb: 12,
          env: { WHO: 'restored' },
        });
        if (b.mode === 'snapshot') snap = b;
        else {
          await c.remove(b.id, true);
          await new Promise((r) => setTimeout(r, 1000));
        }
      }
      assert.ok(snap, 'no box was restored from a snapshot within 120 s');
      const twin = await c.create<{ id: string; mode: string }>({ image: 'debian:bookworm', ...size });
      assert.equal(twin.mode, 'snapshot');
      const withVolume = await c.create<{ id: string; mode: string }>({
        image: 'debian:bookworm',
        ...size,
        volumes: [{ host_path: join(roots, 'data'), guest_path: '/mnt/data', readonly: true }],
      });
      assert.equal(withVolume.mode, 'snapshot');
      const read = await c.exec<{ id: string }>(withVolume.id, { cmd: ['cat', '/mnt/data/shared.txt'] });
      assert.equal(stdoutOf(await collect(c, withVolume.id, read.id)).toString(), 'from the host\n');
      await c.remove(withVolume.id, true);
      const probe = [
        'sh',
        '-c',
        'hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1; echo $WHO; df -k / | tail -1',
      ];
      const a = stdoutOf(
        await collect(c, snap.id, (await c.exec<{ id: string }>(snap.id, { cmd: probe })).id),
      )
        .toString()
        .split('\n');
      const b = stdoutOf(
        await collect(c, twin.id, (await c.exec<{ id: string }>(twin.id, { cmd: probe })).id),
      )
        .toString()
        .split('\n');
      assert.equal(a[0], snap.id.replace('_', '-'));
      assert.equal(b[0], twin.id.replace('_', '-'));
      assert.notEqual(a[1], b[1]);
      assert.notEqual(a[2], b[2]);
      assert.equal(a[3], 'restored');
      // The restored box's filesystem grew to its own disk size (12 GiB), the twin's is 8 GiB.
      const kb = (line: string | undefined): number => Number((line ?? '').trim().split(/\s+/)[1]);
      assert.ok(kb(a[4]) > 11 * 1024 * 1024, `df: ${a[4]}`);
      assert.ok(kb(b[4]) > 7 * 1024 * 1024 && kb(b[4]) < 9 * 1024 * 1024, `df: ${b[4]}`);
      // Files are each box's own.
      await collect(
        c,
        snap.id,
        (await c.exec<{ id: string }>(snap.id, { cmd: ['sh', '-c', 'echo mine > /root/f'] })).id,
      );
      const other = await c.exec<{ id: string }>(twin.id, { cmd: ['sh', '-c', 'cat /root/f 2>&1 || true'] });
      assert.match(stdoutOf(await collect(c, twin.id, other.id)).toString(), /No such file/);
      // A restored box stops and starts like any other, keeping what it wrote.
      await c.stop(snap.id);
      assert.equal((await c.start<{ mode: string }>(snap.id)).mode, 'cold');
      const kept = await c.exec<{ id: string }>(snap.id, { cmd: ['cat', '/root/f'] });
      assert.equal(stdoutOf(await collect(c, snap.id, kept.id)).toString(), 'mine\n');
    } finally {
      await cleanup(d);
      rmSync(roots, { recursive: true, force: true });
    }
  });
});
