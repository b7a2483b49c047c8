import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { WebSocket } from 'ws';
import { HutchClient } from '../../src/client/http-client.js';
import { api, cleanup, root, startDaemon, type TestDaemon, until, waitFor } from '../helpers/daemon.js';
import { checkTerminal, TmuxSession } from '../helpers/tmux.js';

/** A WebSocket viewer that keeps everything it received. */
interface Viewer {
  ws: WebSocket;
  text(): string;
  closed: Promise<{ code: number; reason: string }>;
}

function connect(url: string): Promise<Viewer> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const chunks: Buffer[] = [];
    const closed = new Promise<{ code: number; reason: string }>((r) =>
      ws.on('close', (code, reason) => r({ code, reason: reason.toString('utf8') })),
    );
    ws.on('message', (data: Buffer, isBinary) => {
      if (isBinary) chunks.push(data);
    });
    ws.once('open', () => resolve({ ws, text: () => Buffer.concat(chunks).toString('utf8'), closed }));
    ws.once('error', reject);
  });
}

/** The HTTP answer to an upgrade that the server refuses. */
function refusedUpgrade(url: string): Promise<{ status: number; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.once('open', () => reject(new Error('the upgrade was accepted')));
    ws.once('unexpected-response', (_req, res) => {
      let text = '';
      res.on('data', (b: Buffer) => {
        text += b.toString();
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) }));
    });
    ws.once('error', () => {
      // after unexpected-response
    });
  });
}

/** Runs a program without blocking the event loop (a blocked loop breaks fetch's idle sockets). */
async function run(cmd: string, args: string[]): Promise<string> {
  const r = await promisify(execFile)(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 20 });
  return r.stdout;
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

function peakRssMb(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) / 1024;
}

describe('machine channels: tty, files, streaming exec, attach', () => {
  let d: TestDaemon;
  let id: string;
  let client: HutchClient;
  let tmp: string;
  const ws = (path: string): string => `${d.url.replace(/^http/, 'ws')}${path}`;
  const sh = async (cmd: string): Promise<{ exit_code: number; stdout: string; stderr: string }> => {
    const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body as unknown as { exit_code: number; stdout: string; stderr: string };
  };

  before(async () => {
    tmp = mkdtempSync(join(tmpdir(), 'hutch-channels-'));
    d = await startDaemon();
    client = new HutchClient(d.url);
    const r = await api(d.url, 'POST', '/v1/machines', {
      template: 'python',
      ttl_seconds: 900,
      mode: 'cold',
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    id = r.body.id as string;
  });
  after(async () => {
    rmSync(tmp, { recursive: true, force: true });
    await cleanup(d);
  });

  test('tty: replay for new viewers, many viewers, typed commands run', async () => {
    const a = await connect(ws(`/v1/machines/${id}/tty`));
    await until('boot output replayed to the first viewer', () => a.text().length > 0);
    const b = await connect(ws(`/v1/machines/${id}/tty`));
    await until('replay to the second viewer', () => b.text().length > 0);
    a.ws.send(Buffer.from('echo tty-$((6*7))\n'));
    await until('the output on viewer a', () => /tty-42/.test(a.text()));
    await until('the output on viewer b', () => /tty-42/.test(b.text()));
    // A late viewer sees it in the replay, before typing anything.
    const c = await connect(ws(`/v1/machines/${id}/tty`));
    await until('replay of earlier output', () => /tty-42/.test(c.text()));
    for (const v of [a, b, c]) v.ws.close();

    const missing = await refusedUpgrade(ws('/v1/machines/m-00000000/tty'));
    assert.equal(missing.status, 404);
    assert.equal(missing.body.code, 'MACHINE_NOT_FOUND');
    const plain = await api(d.url, 'GET', `/v1/machines/${id}/tty`);
    assert.equal(plain.status, 426);
    assert.equal(plain.body.code, 'UPGRADE_REQUIRED');
  });

  test('upload and download 100 MB, checksums both ways, through the client and curl', async (t) => {
    const size = 100 * 1024 * 1024;
    const file = join(tmp, 'big.bin');
    const fd = openSync(file, 'w');
    const hash = createHash('sha256');
    for (let i = 0; i < size / (1 << 20); i++) {
      const chunk = randomBytes(1 << 20);
      hash.update(chunk);
      writeSync(fd, chunk);
    }
    closeSync(fd);
    const want = hash.digest('hex');
    const rssBefore = peakRssMb(d.proc.pid ?? 0);

    let t0 = performance.now();
    const up = await client.upload(id, 'big.bin', file);
    const upSecs = (performance.now() - t0) / 1000;
    assert.deepEqual(up, { path: '/root/big.bin', size });
    assert.equal((await sh('sha256sum /root/big.bin')).stdout.split(' ')[0], want);

    t0 = performance.now();
    const down = await client.download(id, '/root/big.bin');
    assert.equal(down.size, size, 'content-length is the file size');
    const h = createHash('sha256');
    let got = 0;
    for await (const chunk of down.stream as AsyncIterable<Buffer>) {
      h.update(chunk);
      got += chunk.length;
    }
    const downSecs = (performance.now() - t0) / 1000;
    assert.equal(got, size);
    assert.equal(h.digest('hex'), want);
    const rssGrowth = peakRssMb(d.proc.pid ?? 0) - rssBefore;
    t.diagnostic(
      `100 MB: upload ${(100 / upSecs).toFixed(1)} MB/s, download ${(100 / downSecs).toFixed(1)} MB/s; daemon peak RSS +${rssGrowth.toFixed(0)} MB`,
    );
    assert.ok(rssGrowth < 60, `the daemon buffered the file (peak RSS grew ${rssGrowth} MB)`);
    await sh('rm -f /root/big.bin');

    // The same with curl: --data-binary @file up, -o down.
    t0 = performance.now();
    const curlUp = JSON.parse(
      await run('curl', [
        '-sS',
        '--fail-with-body',
        '-X',
        'POST',
        '-H',
        'X-Filename: curl.bin',
        '--data-binary',
        `@${file}`,
        `${d.url}/v1/machines/${id}/upload`,
      ]),
    );
    const curlUpSecs = (performance.now() - t0) / 1000;
    assert.deepEqual(curlUp, { path: '/root/curl.bin', size });
    assert.equal((await sh('sha256sum /root/curl.bin')).stdout.split(' ')[0], want);
    const out = join(tmp, 'curl-out.bin');
    t0 = performance.now();
    await run('curl', [
      '-sS',
      '--fail',
      '-o',
      out,
      `${d.url}/v1/machines/${id}/download?path=${encodeURIComponent('/root/curl.bin')}`,
    ]);
    const curlDownSecs = (performance.now() - t0) / 1000;
    assert.equal(sha256(readFileSync(out)), want);
    t.diagnostic(
      `curl 100 MB: upload ${(100 / curlUpSecs).toFixed(1)} MB/s, download ${(100 / curlDownSecs).toFixed(1)} MB/s`,
    );
    await sh('rm -f /root/curl.bin');
  });

  test('upload refuses bad names and path traversal, writing nothing', async () => {
    const before = (await sh('ls -A /root; echo ---; ls -A /; echo ---; ls -A /tmp')).stdout;
    for (const name of [
      '',
      '.',
      '..',
      '../evil',
      'a/b',
      '/etc/evil',
      'x%2Fy',
      '%2e%2e',
      '..%2Fevil',
      'a%00b',
    ]) {
      const res = await fetch(`${d.url}/v1/machines/${id}/upload`, {
        method: 'POST',
        headers: { 'x-filename': name },
        body: 'evil',
      });
      const body = (await res.json()) as { code: string };
      assert.equal(res.status, 400, `X-Filename ${JSON.stringify(name)}`);
      assert.equal(body.code, 'INVALID_ARGUMENT');
    }
    const none = await fetch(`${d.url}/v1/machines/${id}/upload`, { method: 'POST', body: 'evil' });
    assert.equal(none.status, 400);
    const after = (await sh('ls -A /root; echo ---; ls -A /; echo ---; ls -A /tmp')).stdout;
    assert.equal(after, before, 'nothing was written');

    // A name that needs percent-encoding is fine, and lands in /root.
    const ok = await client.upload(id, 'résumé .txt', Readable.from([Buffer.from('hi')]));
    assert.deepEqual(ok, { path: '/root/résumé .txt', size: 2 });
    assert.equal((await sh("cat '/root/résumé .txt'")).stdout, 'hi');
  });

  test('download: missing file 404, directory 409, relative path 400', async () => {
    const get = async (path: string, machine = id) => {
      const res = await fetch(`${d.url}/v1/machines/${machine}/download?path=${encodeURIComponent(path)}`);
      return { status: res.status, body: (await res.json()) as { code: string } };
    };
    assert.deepEqual(await get('/root/no-such-file'), {
      status: 404,
      body: { code: 'FILE_NOT_FOUND', message: `no file "/root/no-such-file" in machine ${id}` },
    });
    const dir = await get('/root');
    assert.equal(dir.status, 409);
    assert.equal(dir.body.code, 'NOT_A_FILE');
    assert.equal((await get('etc/passwd')).body.code, 'INVALID_ARGUMENT');
    assert.equal((await get('/etc/passwd', 'm-00000000')).body.code, 'MACHINE_NOT_FOUND');
  });

  test('streaming exec: output arrives while the command runs', async () => {
    // The command waits for a file that the test creates only once it has seen the first line:
    // "b released" proves the first line came out before the command finished.
    const events: { type: string; text?: string }[] = [];
    for await (const e of client.execStream(id, {
      cmd: 'rm -f /tmp/go; echo a; i=0; while [ ! -e /tmp/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -e /tmp/go ] && echo b released || echo b timeout',
    })) {
      if (e.type === 'stdout' || e.type === 'stderr') {
        events.push({ type: e.type, text: e.data.toString() });
        if (e.data.toString() === 'a\n') await sh('touch /tmp/go');
      } else events.push({ type: e.type });
    }
    assert.deepEqual(events, [
      { type: 'stdout', text: 'a\n' },
      { type: 'stdout', text: 'b released\n' },
      { type: 'exit' },
    ]);

    // The brief's example: two lines, two separate events, then the exit.
    const lines: unknown[] = [];
    for await (const e of client.execStream(id, { cmd: 'echo a; sleep 2; echo b >&2; exit 4' }))
      lines.push(
        e.type === 'exit'
          ? [e.type, e.exit_code]
          : e.type === 'error'
            ? [e.type, e.code]
            : [e.type, e.data.toString()],
      );
    assert.deepEqual(lines, [
      ['stdout', 'a\n'],
      ['stderr', 'b\n'],
      ['exit', 4],
    ]);

    const withStdin: string[] = [];
    for await (const e of client.execStream(id, { cmd: ['cat'], stdin: 'from stdin' }))
      if (e.type === 'stdout') withStdin.push(e.data.toString());
    assert.equal(withStdin.join(''), 'from stdin');
    await assert.rejects(
      async () => {
        for await (const _ of client.execStream(id, { cmd: ['/no/such/program'] })) {
          // nothing
        }
      },
      { code: 'EXEC_FAILED', status: 422 },
    );
  });

  test('streaming exec: bytes that are not UTF-8 round-trip exactly; UTF-8 stays text', async () => {
    await sh('head -c 300000 /dev/urandom > /tmp/r');
    const want = (await sh('sha256sum /tmp/r')).stdout.split(' ')[0];
    const res = await fetch(`${d.url}/v1/machines/${id}/exec/stream`, {
      method: 'POST',
      body: JSON.stringify({ cmd: 'cat /tmp/r; python3 -c "import sys; sys.stderr.write(\'é€😀\'*50000)"' }),
    });
    assert.equal(res.headers.get('content-type'), 'application/x-ndjson');
    const lines = (await res.text())
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l) as { type: string; data: string; encoding?: string });
    const bytes = (type: string): Buffer =>
      Buffer.concat(
        lines
          .filter((l) => l.type === type)
          .map((l) => Buffer.from(l.data, l.encoding === 'base64' ? 'base64' : 'utf8')),
      );
    assert.equal(sha256(bytes('stdout')), want);
    assert.ok(lines.some((l) => l.type === 'stdout' && l.encoding === 'base64'));
    const err = lines.filter((l) => l.type === 'stderr');
    assert.ok(err.length > 1, 'stderr came in several lines');
    for (const l of err) assert.equal(l.encoding, undefined, 'valid UTF-8 is never split into base64');
    assert.equal(bytes('stderr').toString('utf8'), 'é€😀'.repeat(50000));
    assert.deepEqual(lines.at(-1)?.type, 'exit');
  });

  test('streaming exec: the client closing the connection kills the command', async () => {
    const ac = new AbortController();
    await assert.rejects(async () => {
      for await (const e of client.execStream(id, { cmd: 'echo started; sleep 3001; echo never' }, ac.signal))
        if (e.type === 'stdout' && e.data.toString() === 'started\n') {
          assert.match((await sh('pgrep -f "sleep 300[1]" || true')).stdout, /\d/);
          ac.abort();
        }
    });
    await waitFor(
      'the command to be killed',
      async () => ((await sh('pgrep -f "sleep 300[1]" || true')).stdout.trim() === '' ? true : undefined),
      20_000,
    );
  });

  test('CLI: exec streams bytes exactly and exits with the code; upload and download', () => {
    const hutch = (...args: string[]) =>
      spawnSync('node', [join(root, 'bin', 'hutch.js'), ...args], {
        env: { ...process.env, HUTCH_URL: d.url },
        timeout: 120_000,
      });
    const r = hutch('exec', id, '--', 'sh', '-c', "printf 'a\\377b\\n'; printf 'err\\n' >&2; exit 5");
    assert.equal(r.status, 5, r.stderr.toString());
    assert.deepEqual(r.stdout, Buffer.from([0x61, 0xff, 0x62, 0x0a]));
    assert.equal(r.stderr.toString(), 'err\n');

    const src = join(tmp, 'small.bin');
    const data = randomBytes(300_000);
    const fd = openSync(src, 'w');
    writeSync(fd, data);
    closeSync(fd);
    const up = hutch('upload', id, src, '--name', 'small.bin');
    assert.equal(up.status, 0, up.stderr.toString());
    assert.equal(up.stdout.toString(), `/root/small.bin\t${data.length}\n`);
    const out = join(tmp, 'small.out');
    const down = hutch('download', id, '/root/small.bin', '-o', out);
    assert.equal(down.status, 0, down.stderr.toString());
    assert.deepEqual(readFileSync(out), data);
    const missing = hutch('download', id, '/root/nope');
    assert.equal(missing.status, 1);
    assert.match(missing.stderr.toString(), /FILE_NOT_FOUND/);
  });

  test('CLI: tty shows the console and types into it; Ctrl-] leaves', async () => {
    const p = spawn('node', [join(root, 'bin', 'hutch.js'), 'tty', id], {
      env: { ...process.env, HUTCH_URL: d.url },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    p.stdout.on('data', (b: Buffer) => {
      out += b.toString();
    });
    p.stderr.on('data', (b: Buffer) => {
      err += b.toString();
    });
    const exited = new Promise<number | null>((r) => p.on('exit', (code) => r(code)));
    try {
      await until('the replay', () => out.length > 0).catch((e: Error) => {
        throw new Error(`${e.message}; exit ${p.exitCode}, stderr: ${err}`);
      });
      p.stdin.write('echo cli-tty-$((2*21))\n');
      await until('the typed command to run', () => /cli-tty-42/.test(out));
      p.stdin.write(Buffer.from([0x1d]));
      assert.equal(await exited, 0);
    } finally {
      p.kill();
    }
  });

  test('attach: the real CLI under tmux (size, resize, Ctrl-C, exit code)', async () => {
    const statusFile = join(tmp, 'attach-status');
    const t = new TmuxSession(tmp);
    const bin = join(root, 'bin', 'hutch.js');
    try {
      t.start(
        `HUTCH_URL=${d.url} node ${bin} attach ${id}; echo "exit=$?" > ${statusFile}; sleep 60`,
        100,
        30,
      );
      await checkTerminal(t, async (name) => (await sh(`pgrep -x ${name} || true`)).stdout.trim());
      t.keys('exit 3', 'Enter');
      await until('the CLI to exit', () => existsSync(statusFile), 30_000);
      assert.equal(readFileSync(statusFile, 'utf8').trim(), 'exit=3');
    } finally {
      t.kill();
    }
  });

  test('channels close with a reason when the machine goes away', async () => {
    const r = await api(d.url, 'POST', '/v1/machines', {
      template: 'python',
      ttl_seconds: 300,
      mode: 'cold',
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const other = r.body.id as string;
    const viewer = await connect(ws(`/v1/machines/${other}/tty`));
    const shell = await connect(ws(`/v1/machines/${other}/attach?shell=/bin/sh&cols=80&rows=24`));
    assert.equal((await api(d.url, 'DELETE', `/v1/machines/${other}`)).status, 204);
    for (const v of [viewer, shell]) {
      const c = await v.closed;
      assert.equal(c.code, 1001);
      assert.match(c.reason, new RegExp(`machine ${other} went away`));
    }
    const bad = await refusedUpgrade(ws(`/v1/machines/${id}/attach?shell=/no/such/shell`));
    assert.equal(bad.status, 422);
    assert.equal(bad.body.code, 'EXEC_FAILED');
  });
});
