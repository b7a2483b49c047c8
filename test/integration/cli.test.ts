import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { cleanup, root, startDaemon, type TestDaemon } from '../helpers/daemon.js';

function hutch(d: TestDaemon, ...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('node', [join(root, 'bin', 'hutch.js'), ...args], {
    encoding: 'utf8',
    env: { ...process.env, HUTCH_URL: d.url },
    timeout: 120_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('the hutch CLI', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon();
  });
  after(async () => cleanup(d));

  test('new, ls, get, exec, rm with --json', () => {
    const created = hutch(d, 'new', '--json', '--ttl', '120', '--name', 'cli-box');
    assert.equal(created.status, 0, created.stderr);
    const m = JSON.parse(created.stdout) as { id: string; status: string; name: string };
    assert.equal(m.status, 'running');
    assert.equal(m.name, 'cli-box');

    const ls = JSON.parse(hutch(d, 'ls', '--json').stdout) as { id: string }[];
    assert.deepEqual(
      ls.map((x) => x.id),
      [m.id],
    );
    assert.equal((JSON.parse(hutch(d, 'get', 'cli-box', '--json').stdout) as { id: string }).id, m.id);

    const v = hutch(d, 'exec', m.id, '--', 'python3', '-V');
    assert.equal(v.status, 0);
    assert.match(v.stdout, /^Python 3\.\d+\.\d+\n$/);
    const failing = hutch(d, 'exec', m.id, '--', 'sh', '-c', 'echo oops >&2; exit 3');
    assert.equal(failing.status, 3, "hutch exec exits with the command's exit code");
    assert.equal(failing.stderr, 'oops\n');
    const j = JSON.parse(hutch(d, 'exec', '--json', m.id, '--', 'echo', 'hi').stdout) as {
      stdout: string;
      exit_code: number;
    };
    assert.deepEqual([j.stdout, j.exit_code], ['hi\n', 0]);

    const rm = hutch(d, 'rm', '--json', m.id);
    assert.equal(rm.status, 0);
    assert.deepEqual(JSON.parse(rm.stdout), { removed: [m.id] });
    assert.deepEqual(JSON.parse(hutch(d, 'ls', '--json').stdout), []);
  });

  test('errors are clear and exit non-zero', () => {
    const r = hutch(d, 'get', 'm-00000000');
    assert.equal(r.status, 1);
    assert.match(r.stderr, /MACHINE_NOT_FOUND/);
    const j = hutch(d, 'rm', '--json', 'm-00000000');
    assert.equal(JSON.parse(j.stdout).code, 'MACHINE_NOT_FOUND');
    const down = spawnSync('node', [join(root, 'bin', 'hutch.js'), 'ls', '--url', 'http://127.0.0.1:1'], {
      encoding: 'utf8',
    });
    assert.equal(down.status, 1);
    assert.match(down.stderr, /cannot reach the hutch daemon/);
  });
});
