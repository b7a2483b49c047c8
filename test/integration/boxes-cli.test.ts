import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { WebSocket } from 'ws';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { ApiError } from '../../src/client/http-client.js';
import { cleanup, root, sleep, startDaemon, type TestDaemon, until, waitFor } from '../helpers/daemon.js';
import { checkTerminal, TmuxSession } from '../helpers/tmux.js';

/** Sizes that spare the 2 cores. */
const small = ['--cpu', '1', '--memory', '256'];
const bin = join(root, 'bin', 'hutch.js');

interface CliResult {
  code: number | null;
  stdout: Buffer;
  stderr: Buffer;
  /** When each stdout chunk arrived, ms after the start. */
  stdoutTimes: number[];
  ms: number;
}

/** The real CLI as a child process (async: the event loop keeps serving the test's sockets). */
function cli(
  args: string[],
  opts: { input?: Buffer; onStdout?: (all: Buffer, child: ReturnType<typeof spawn>) => void } = {},
): Promise<CliResult> {
  const t0 = Date.now();
  const child = spawn('node', [bin, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const stdoutTimes: number[] = [];
  child.stdout.on('data', (b: Buffer) => {
    out.push(b);
    stdoutTimes.push(Date.now() - t0);
    opts.onStdout?.(Buffer.concat(out), child);
  });
  child.stderr.on('data', (b: Buffer) => err.push(b));
  child.stdin.end(opts.input);
  return new Promise((resolve) =>
    child.on('close', (code) =>
      resolve({
        code,
        stdout: Buffer.concat(out),
        stderr: Buffer.concat(err),
        stdoutTimes,
        ms: Date.now() - t0,
      }),
    ),
  );
}

function ok(r: CliResult, code = 0): CliResult {
  assert.equal(r.code, code, `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/** Runs a shell command over an attach WebSocket and resolves with the output seen so far. */
function terminalOf(ws: WebSocket): { text: () => string; exit: Promise<number> } {
  const chunks: Buffer[] = [];
  const exit = new Promise<number>((resolve, reject) => {
    ws.on('message', (data: Buffer, isBinary) => {
      if (isBinary) chunks.push(data);
      else {
        const m = JSON.parse(data.toString('utf8')) as { type: string; code: number };
        if (m.type === 'exit') resolve(m.code);
      }
    });
    ws.on('close', () => reject(new Error('closed without an exit message')));
  });
  exit.catch(() => {});
  ws.resume();
  return { text: () => Buffer.concat(chunks).toString('utf8'), exit };
}

describe('hutch box CLI', { timeout: 900_000 }, () => {
  let d: TestDaemon;
  let c: BoxesClient;
  let tmp: string;
  let box: string;
  /** `hutch box SUB --socket … ARGS` (the socket flag before any `--`). */
  const box$ = (sub: string, ...args: string[]): Promise<CliResult> =>
    cli(['box', sub, '--socket', d.boxesSocket, ...args]);

  before(async () => {
    tmp = mkdtempSync(join(tmpdir(), 'hutch-boxes-cli-'));
    d = await startDaemon({ env: { HUTCH_BOXES_LISTEN: '127.0.0.1:0' } });
    c = new BoxesClient({ socketPath: d.boxesSocket });
  });
  after(async () => {
    rmSync(tmp, { recursive: true, force: true });
    await cleanup(d);
  });

  test('create, ls, get, info, with and without --json', async () => {
    const created = ok(
      await box$(
        'create',
        'debian:bookworm',
        '--name',
        'clibox',
        ...small,
        '--env',
        'GREETING=hello',
        '--env',
        'EQ=a=b',
        '--workdir',
        '/tmp',
      ),
    );
    box = created.stdout.toString().trim();
    assert.match(box, /^box_[0-9a-f]+$/);
    const api = await c.get<Record<string, unknown>>(box);
    assert.equal(api.name, 'clibox');
    assert.equal(api.cpu, 1);
    assert.equal(api.memory_mb, 256);
    assert.equal(api.workdir, '/tmp');
    assert.deepEqual(api.env, { GREETING: 'hello', EQ: 'a=b' });

    const ls = ok(await box$('ls')).stdout.toString();
    assert.match(ls, new RegExp(`^${box}\\tclibox\\trunning\\tdebian:bookworm\\t`, 'm'));
    assert.deepEqual(JSON.parse(ok(await box$('ls', '--json')).stdout.toString()), await c.list());
    assert.deepEqual(JSON.parse(ok(await box$('ls', '--status', 'stopped', '--json')).stdout.toString()), {
      boxes: [],
    });
    assert.equal(ok(await box$('ls', '--status', 'stopped')).stdout.length, 0);
    const got = JSON.parse(ok(await box$('get', 'clibox', '--json')).stdout.toString()) as { id: string };
    assert.equal(got.id, box);
    assert.match(ok(await box$('get', box)).stdout.toString(), /\trunning\t/);
    assert.deepEqual(JSON.parse(ok(await box$('info', '--json')).stdout.toString()), await c.info());
    assert.match(ok(await box$('info')).stdout.toString(), /^max_cpu\t\d+$/m);

    // Errors: the API's code and message, exit 1; with --json, the API's error JSON.
    const missing = await box$('get', 'box_000000000000', '--json');
    assert.equal(missing.code, 1);
    assert.equal((JSON.parse(missing.stdout.toString()) as { code: string }).code, 'BOX_NOT_FOUND');
    assert.match(missing.stderr.toString(), /^hutch: BOX_NOT_FOUND: /);
    const usage = await box$('create');
    assert.equal(usage.code, 2);
    assert.match(usage.stderr.toString(), /usage: hutch box create IMAGE/);
    const unreachable = await cli(['box', 'ls', '--socket', join(tmp, 'nothing.sock')]);
    assert.equal(unreachable.code, 1);
    assert.match(unreachable.stderr.toString(), /UNREACHABLE/);
  });

  test('exec: exact bytes (not UTF-8 too), exit codes, env/workdir, live streaming, --json, Ctrl-C', async () => {
    const r = ok(
      await box$('exec', box, '--', 'sh', '-c', 'printf "a\\377\\376b\\n"; printf "err\\200\\n" >&2; exit 7'),
      7,
    );
    assert.deepEqual(r.stdout, Buffer.from([0x61, 0xff, 0xfe, 0x62, 0x0a]));
    assert.deepEqual(r.stderr, Buffer.from([0x65, 0x72, 0x72, 0x80, 0x0a]));

    // 1 MB of random bytes: what arrives is what the guest wrote (its sha256 on stderr).
    const big = ok(
      await box$('exec', box, '--', 'sh', '-c', 'head -c 1000000 /dev/urandom > r; cat r; sha256sum r >&2'),
    );
    assert.equal(big.stdout.length, 1_000_000);
    assert.equal(createHash('sha256').update(big.stdout).digest('hex'), big.stderr.toString().split(' ')[0]);

    const env = ok(
      await box$(
        'exec',
        '--env',
        'WHO=cli',
        '--workdir',
        '/root',
        box,
        '--',
        'sh',
        '-c',
        'echo $GREETING $WHO; pwd',
      ),
    );
    assert.equal(env.stdout.toString(), 'hello cli\n/root\n');
    assert.equal(ok(await box$('exec', box, '--', 'pwd')).stdout.toString(), '/tmp\n');

    const timedOut = ok(await box$('exec', '--timeout', '500', box, '--', 'sleep', '30'), 124);
    assert.match(timedOut.stderr.toString(), /timeout/);
    const missing = await box$('exec', box, '--', '/no/such/program');
    assert.equal(missing.code, 1);
    assert.match(missing.stderr.toString(), /EXEC_FAILED/);

    // Live: the first line is on stdout seconds before the command ends.
    const live = ok(await box$('exec', box, '--', 'sh', '-c', 'echo first; sleep 3; echo second'));
    assert.equal(live.stdout.toString(), 'first\nsecond\n');
    assert.ok(live.stdoutTimes.length >= 2, `chunks at ${live.stdoutTimes}`);
    assert.ok(
      live.ms - (live.stdoutTimes[0] ?? 0) >= 2500,
      `first at ${live.stdoutTimes[0]}, end ${live.ms}`,
    );

    // --json: the exec, then each SSE event, one per line, as the API sends them.
    const j = ok(await box$('exec', '--json', box, '--', 'sh', '-c', 'echo out; exit 3'), 3);
    const lines = j.stdout
      .toString()
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    const exec = lines[0] as { id: string; cmd: string[] };
    assert.match(exec.id, /^exec_/);
    assert.deepEqual(exec.cmd, ['sh', '-c', 'echo out; exit 3']);
    const events = [];
    for await (const e of c.events(box, exec.id)) events.push(e);
    assert.deepEqual(lines.slice(1), events);

    // -d returns at once; logs replays and exits with the code.
    const detached = ok(await box$('exec', '-d', box, '--', 'sh', '-c', 'sleep 1; echo later; exit 4'));
    const eid = detached.stdout.toString().trim();
    assert.match(eid, /^exec_/);
    const logs = ok(await box$('logs', box, eid), 4);
    assert.equal(logs.stdout.toString(), 'later\n');
    assert.match(
      ok(await box$('execs', box)).stdout.toString(),
      new RegExp(`^${eid}\\tcompleted\\t4\\t`, 'm'),
    );

    // Ctrl-C cancels the command in the box; the CLI reports it as killed (128+9).
    const interrupted = await cli(
      ['box', 'exec', '--socket', d.boxesSocket, box, '--', 'sh', '-c', 'echo started; sleep 60'],
      {
        onStdout: (all, child) => {
          if (all.toString() === 'started\n') child.kill('SIGINT');
        },
      },
    );
    assert.equal(interrupted.code, 137, interrupted.stderr.toString());
    const execs = (await c.execs<{ execs: { status: string }[] }>(box)).execs;
    assert.equal(execs.at(-1)?.status, 'cancelled');
    assert.equal((await box$('exec', box, '--', 'pgrep', '-x', 'sleep')).code, 1, 'sleep 60 is gone');
  });

  test('upload, download, run', async () => {
    const content = randomBytes(200_000);
    const file = join(tmp, 'data.bin');
    writeFileSync(file, content);
    assert.equal(ok(await box$('upload', box, file)).stdout.toString(), '/root/data.bin\t200000\n');
    const up = JSON.parse(ok(await box$('upload', '--json', box, '-', '/root/stdin.bin')).stdout.toString());
    assert.deepEqual(up, { ok: true, dest: '/root/stdin.bin', size: 0 });
    const piped = await cli(['box', 'upload', '--socket', d.boxesSocket, box, '-', '/root/piped.bin'], {
      input: content,
    });
    ok(piped);
    assert.deepEqual(ok(await box$('download', box, '/root/data.bin')).stdout, content);
    const out = join(tmp, 'back.bin');
    ok(await box$('download', box, '/root/piped.bin', '-o', out));
    assert.deepEqual(readFileSync(out), content);
    const gone = await box$('download', box, '/root/nope');
    assert.equal(gone.code, 1);
    assert.match(gone.stderr.toString(), /^hutch: [A-Z_]+: /);

    const run = await box$(
      'run',
      ...small,
      'debian:bookworm',
      '--',
      'sh',
      '-c',
      'echo hi; echo oops >&2; exit 4',
    );
    ok(run, 4);
    assert.equal(run.stdout.toString(), 'hi\n');
    assert.equal(run.stderr.toString(), 'oops\n');
    const runJson = ok(await box$('run', '--json', ...small, 'debian:bookworm', '--', 'true'));
    assert.deepEqual(JSON.parse(runJson.stdout.toString()), {
      exit_code: 0,
      stdout: '',
      stderr: '',
      error_message: null,
      status: 'completed',
      signal: null,
    });
    // The ephemeral boxes are gone.
    assert.deepEqual(
      (await c.list<{ boxes: { id: string }[] }>()).boxes.map((b) => b.id),
      [box],
    );
  });

  test('attach: the real CLI under tmux (size, resize, Ctrl-C, top, exit code)', async () => {
    const statusFile = join(tmp, 'attach-status');
    const t = new TmuxSession(tmp);
    const pgrep = async (name: string): Promise<string> =>
      (await box$('exec', box, '--', 'sh', '-c', `pgrep -x ${name} || true`)).stdout.toString().trim();
    try {
      t.start(
        `node ${bin} box attach ${box} --socket ${d.boxesSocket}; echo "exit=$?" > ${statusFile}; sleep 60`,
        100,
        30,
      );
      await until('a shell prompt', () => /[#$] *$/m.test(t.screen()), 60_000);
      t.keys('echo shell=$0', 'Enter');
      await until('bash, the default shell', () => /^shell=\/bin\/bash\s*$/m.test(t.screen()));
      await checkTerminal(t, pgrep);

      // A full-screen program: top draws its header, q leaves it, the shell is back.
      t.keys('clear; top', 'Enter');
      await until(
        'top to draw',
        () => /^top - .*load average/m.test(t.screen()) && /^Tasks:/m.test(t.screen()),
        60_000,
      );
      assert.ok(await pgrep('top'), 'top runs');
      t.keys('q');
      // Keys typed while top is still exiting may be flushed by it: wait until it is gone.
      await waitFor('top to exit on q', async () => ((await pgrep('top')) === '' ? true : undefined), 30_000);
      t.keys('echo top-$((6*7))', 'Enter');
      await until('the shell back after top', () => /^top-42\s*$/m.test(t.screen()), 30_000).catch(
        (e: Error) => {
          throw new Error(`${e.message}; the screen:\n${t.screen()}`);
        },
      );

      t.keys('exit 3', 'Enter');
      await until('the CLI to exit', () => existsSync(statusFile), 30_000);
      assert.equal(readFileSync(statusFile, 'utf8').trim(), 'exit=3');
    } finally {
      t.kill();
    }
  });

  test('attach over the WebSocket, Unix socket and TCP: resize, refusals before the upgrade', async () => {
    assert.ok(d.boxesUrl, `no TCP endpoint in the daemon log:\n${d.log()}`);
    for (const client of [c, new BoxesClient({ url: d.boxesUrl })]) {
      const ws = await client.openAttach(box, { cols: 91, rows: 27, shell: '/bin/sh' });
      const t = terminalOf(ws);
      ws.send(Buffer.from('stty size; echo shell=$0\n'));
      // Both answers, in order; the second may still be on its way when the first shows.
      await until('stty size = 27 91, then shell=/bin/sh', () =>
        /(^|[#$] )27 91\s*$[\s\S]*(^|[#$] )shell=\/bin\/sh\s*$/m.test(t.text()),
      ).catch((e: Error) => {
        throw new Error(`${e.message}; the terminal shows ${JSON.stringify(t.text())}`);
      });
      ws.send(JSON.stringify({ type: 'resize', cols: 132, rows: 43 }));
      await waitFor(
        'stty size = 43 132 after the resize message',
        async () => {
          ws.send(Buffer.from('stty size\n'));
          await sleep(500);
          return /(^|[#$] )43 132\s*$/m.test(t.text()) ? true : undefined;
        },
        30_000,
      );
      ws.send(Buffer.from('exit 5\n'));
      assert.equal(await t.exit, 5);

      for (const [target, q, status, code] of [
        ['box_000000000000', {}, 404, 'BOX_NOT_FOUND'],
        [box, { cols: 0 }, 400, 'INVALID_ARGUMENT'],
        [box, { cols: 'wide' as unknown as number }, 400, 'INVALID_ARGUMENT'],
        [box, { shell: 'bash' }, 400, 'INVALID_ARGUMENT'],
      ] as const) {
        await assert.rejects(client.openAttach(target, q), (e: unknown) => {
          assert.ok(e instanceof ApiError, String(e));
          assert.equal(e.status, status, `${JSON.stringify(q)}: ${e.message}`);
          assert.equal(e.code, code, e.message);
          assert.ok(e.message.length > 0);
          return true;
        });
      }
    }
  });

  test('attach refused: the CLI reports the API error', async () => {
    const r = await box$('attach', 'box_000000000000');
    assert.equal(r.code, 1);
    assert.match(r.stderr.toString(), /^hutch: BOX_NOT_FOUND: /);
    const bad = await box$('attach', box, '--shell', 'sh');
    assert.equal(bad.code, 1);
    assert.match(bad.stderr.toString(), /^hutch: INVALID_ARGUMENT: /);
  });

  test('stop, start, rm (--force), gc', async () => {
    const other = ok(await box$('create', 'debian:bookworm', '--name', 'second', ...small, '--json'));
    const second = (JSON.parse(other.stdout.toString()) as { id: string; status: string }).id;
    const busy = await box$('rm', second);
    assert.equal(busy.code, 1, 'a running box needs --force');
    assert.match(busy.stderr.toString(), /^hutch: [A-Z_]+: /);
    assert.equal(ok(await box$('rm', '--force', second)).stdout.toString(), `${second}\n`);

    ok(await box$('exec', box, '--', 'sh', '-c', 'echo kept > /root/keep'));
    const stopped = JSON.parse(ok(await box$('stop', box, '--json')).stdout.toString()) as { status: string };
    assert.equal(stopped.status, 'stopped');
    assert.match(ok(await box$('ls', '--status', 'stopped')).stdout.toString(), new RegExp(`^${box}\\t`));
    assert.match(ok(await box$('start', box)).stdout.toString(), /\trunning\t/);
    assert.equal(ok(await box$('exec', box, '--', 'cat', '/root/keep')).stdout.toString(), 'kept\n');
    ok(await box$('stop', box));

    assert.equal(ok(await box$('gc', '--older-than', '3600')).stdout.toString(), 'removed 0\n');
    const gc = JSON.parse(ok(await box$('gc', '--json')).stdout.toString()) as { removed: number };
    assert.equal(gc.removed, 1);
    assert.deepEqual(await c.list(), { boxes: [] });
    const none = await box$('rm', '--json', 'nothing');
    assert.equal(none.code, 1);
    assert.equal((JSON.parse(none.stdout.toString()) as { code: string }).code, 'BOX_NOT_FOUND');
  });
});
