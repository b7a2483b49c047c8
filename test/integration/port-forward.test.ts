// Forwarded ports on a real guest: a daemon runs in this process (so the test reaches its
// Engine, as the preview proxy will, without an HTTP route), boots a python machine, starts
// an HTTP server on the guest's loopback and reaches it through Engine.openPort.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { localPrincipal, type Principal } from '../../src/core/principal.js';
import { type Daemon, startDaemon } from '../../src/daemon.js';
import { HutchError } from '../../src/errors.js';
import { imageDir, qemusOf } from '../helpers/daemon.js';

function readAll(d: Duplex): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    d.on('data', (c: Buffer) => chunks.push(c));
    d.once('end', () => resolve(Buffer.concat(chunks)));
    d.once('error', reject);
  });
}

async function get(d: Duplex, path: string): Promise<string> {
  const body = readAll(d);
  // HTTP/1.0: http.server closes after the answer, so the guest's end ends the read.
  d.end(`GET ${path} HTTP/1.0\r\nHost: preview\r\n\r\n`);
  return (await body).toString('utf8');
}

const isCode = (code: string) => (e: unknown) => e instanceof HutchError && e.code === code;

describe('port forwarding to a real guest', { timeout: 900_000 }, () => {
  let stateDir: string;
  let daemon: Daemon;
  let p: Principal;
  let id: string;
  const logs: string[] = [];

  before(async () => {
    stateDir = mkdtempSync(join(tmpdir(), 'hutch-test-ports-'));
    const config = loadConfig(
      {
        stateDir,
        imageDir,
        port: 0,
        poolSize: 0,
        grpcPort: 'off',
        boxesSocket: 'off',
        cacheGcOnStart: false,
        logLevel: 'warn',
      },
      {},
    );
    daemon = await startDaemon(config, {
      log: (level, msg, fields) => logs.push(JSON.stringify({ level, msg, ...fields })),
    });
    p = localPrincipal(config.owner);
    const m = await daemon.engine.create(p, { template: 'python', ttlSeconds: 600, mode: 'cold' });
    id = m.id;
    const r = await daemon.engine.exec(p, id, {
      argv: [
        'sh',
        '-c',
        'cd /tmp && python3 -m http.server 8000 --bind 127.0.0.1 >/tmp/http.log 2>&1 </dev/null &',
      ],
    });
    assert.equal(r.exit_code, 0, `start the server: ${r.stderr.toJSON()}`);
    r.stdout.release();
    r.stderr.release();
    const deadline = Date.now() + 60_000;
    for (;;) {
      if ((await daemon.engine.listeningPorts(p, id)).includes(8000)) break;
      assert.ok(Date.now() < deadline, 'the guest server never listened on 8000');
      await new Promise((r) => setTimeout(r, 250));
    }
  });

  after(async () => {
    try {
      if (id) await daemon.engine.destroy(p, id);
    } finally {
      await daemon?.close();
      for (const pid of qemusOf(stateDir)) process.kill(pid, 'SIGKILL');
      rmSync(stateDir, { recursive: true, force: true });
    }
  });

  test('listeningPorts lists the server on 8000, sorted', async () => {
    const ports = await daemon.engine.listeningPorts(p, id);
    assert.ok(ports.includes(8000), JSON.stringify(ports));
    assert.deepEqual(
      ports,
      [...ports].sort((a, b) => a - b),
    );
  });

  test('an HTTP GET through openPort returns the page', async () => {
    const text = await get(await daemon.engine.openPort(p, id, 8000), '/');
    assert.match(text, /^HTTP\/1\.0 200 OK\r\n/);
    assert.match(text, /Directory listing for \//);
  });

  test('a port nothing listens on is PORT_NOT_LISTENING', async () => {
    await assert.rejects(daemon.engine.openPort(p, id, 8001), (e: unknown) => {
      assert.ok(e instanceof HutchError);
      assert.equal(e.code, 'PORT_NOT_LISTENING');
      assert.equal(e.message, 'nothing listens on port 8001 in the machine');
      return true;
    });
  });

  test('bad ports, unknown machines and other owners are refused', async () => {
    for (const port of [0, 65536, 80.5, -1, Number.NaN])
      await assert.rejects(daemon.engine.openPort(p, id, port), isCode('INVALID_ARGUMENT'));
    await assert.rejects(daemon.engine.openPort(p, 'm-00000000', 8000), isCode('MACHINE_NOT_FOUND'));
    const other = localPrincipal('someone-else');
    await assert.rejects(daemon.engine.openPort(other, id, 8000), isCode('MACHINE_NOT_FOUND'));
    await assert.rejects(daemon.engine.listeningPorts(other, id), isCode('MACHINE_NOT_FOUND'));
  });

  test('100 open/close cycles leak nothing: 64 at once still open afterwards, the 65th is refused', async () => {
    for (let i = 0; i < 100; i++) (await daemon.engine.openPort(p, id, 8000)).destroy();
    const open: Duplex[] = [];
    try {
      for (let i = 0; i < 64; i++) open.push(await daemon.engine.openPort(p, id, 8000));
      await assert.rejects(daemon.engine.openPort(p, id, 8000), isCode('RESOURCE_EXHAUSTED'));
    } finally {
      for (const d of open) d.destroy();
    }
    // Those closed at once, and a page still loads.
    const text = await get(await daemon.engine.openPort(p, id, 8000), '/');
    assert.match(text, /^HTTP\/1\.0 200 OK/);
  });

  test('a paused machine is MACHINE_NOT_RUNNING', async () => {
    await daemon.engine.pause(p, id);
    try {
      await assert.rejects(daemon.engine.openPort(p, id, 8000), isCode('MACHINE_NOT_RUNNING'));
    } finally {
      await daemon.engine.resume(p, id);
    }
    const text = await get(await daemon.engine.openPort(p, id, 8000), '/');
    assert.match(text, /^HTTP\/1\.0 200 OK/);
  });
});
