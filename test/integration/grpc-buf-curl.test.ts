/**
 * The gRPC API seen by a stock tool with no proto file: `buf curl` (the buf CLI, from npm's
 * @bufbuild/buf) lists the service's methods and calls them through server reflection alone,
 * as the spec says grpcurl and buf curl do.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { cleanup, root, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { tokenFor } from '../helpers/grpc.js';

const buf = join(root, 'node_modules', '.bin', 'buf');

function bufCurl(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(buf, ['curl', '--protocol', 'grpc', '--http2-prior-knowledge', ...args], {
    encoding: 'utf8',
    timeout: 60_000,
    // buf keeps a cache of its own; a fresh one per run keeps the test independent of the host.
    env: { ...process.env, BUF_CACHE_DIR: join(root, 'dist', '.buf-cache') },
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('gRPC through buf curl and reflection alone', () => {
  let d: TestDaemon;
  let base: string;
  let token: string;
  before(async () => {
    d = await startDaemon();
    base = `http://${d.grpcAddress}`;
    token = await tokenFor(d, 'curly');
  });
  after(async () => cleanup(d));

  test('--list-methods names every method of boxd.api.v1.BoxdApi, without a proto file', () => {
    const r = bufCurl(['--list-methods', base]);
    assert.equal(r.status, 0, r.stderr);
    const methods = r.stdout.trim().split('\n');
    for (const m of ['CreateVm', 'Exec', 'StreamLogs', 'ForkVm', 'CreateApiKey', 'SetAutoSuspendTimeout'])
      assert.ok(methods.includes(`boxd.api.v1.BoxdApi/${m}`), `${m} in ${r.stdout}`);
    assert.equal(methods.filter((m) => m.startsWith('boxd.api.v1.BoxdApi/')).length, 41);
  });

  test('calls: Whoami with a token; without one, unauthenticated', () => {
    const me = bufCurl([
      '-H',
      `authorization: Bearer ${token}`,
      '-d',
      '{}',
      `${base}/boxd.api.v1.BoxdApi/Whoami`,
    ]);
    assert.equal(me.status, 0, me.stderr);
    assert.equal((JSON.parse(me.stdout) as { userId: string }).userId, 'curly');
    const cfg = bufCurl([
      '-H',
      `authorization: Bearer ${token}`,
      '-d',
      '{}',
      `${base}/boxd.api.v1.BoxdApi/GetConfig`,
    ]);
    assert.equal(JSON.parse(cfg.stdout).defaultImage, 'debian:bookworm');
    const anon = bufCurl(['-d', '{}', `${base}/boxd.api.v1.BoxdApi/ListVms`]);
    assert.notEqual(anon.status, 0);
    assert.match(anon.stderr, /unauthenticated/i);
  });
});
