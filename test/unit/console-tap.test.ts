import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ConsoleTap } from '../../src/vmm/console.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('console tap', () => {
  let dir: string;
  let server: Server;
  let peer: Promise<Socket>;
  let tap: ConsoleTap;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'hutch-console-'));
    const path = join(dir, 'console.sock');
    peer = new Promise((resolve) => {
      server = createServer((s) => resolve(s));
    });
    await new Promise<void>((r) => server.listen(path, r));
    tap = new ConsoleTap(path, join(dir, 'console.log'), 40 * 1024);
    tap.start();
  });
  after(() => {
    tap.stop();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test('recent output is the last ring-size bytes, however small the reads were', async () => {
    const qemu = await peer;
    const sent = randomBytes(100 * 1024);
    let seen = 0;
    tap.on('data', (b: Buffer) => {
      seen += b.length;
    });
    for (let off = 0; off < sent.length; ) {
      const n = 1 + Math.floor(Math.random() * 3000);
      qemu.write(sent.subarray(off, off + n));
      off += n;
      if (off % 7 === 0) await sleep(0);
    }
    while (seen < sent.length) await sleep(5);
    assert.ok(tap.recent().equals(sent.subarray(sent.length - 40 * 1024)));
  });

  test('keyboard input waits while the console does not read, and is all delivered in order', async () => {
    const qemu = await peer;
    qemu.pause();
    const input = randomBytes(4 * 1024 * 1024);
    const slices: Promise<void>[] = [];
    let resolved = 0;
    for (let off = 0; off < input.length; off += 64 * 1024) {
      const p = tap.write(input.subarray(off, off + 64 * 1024));
      void p.then(() => resolved++);
      slices.push(p);
    }
    await sleep(100);
    assert.ok(resolved < slices.length, 'writes wait for the socket to drain');
    const got: Buffer[] = [];
    let size = 0;
    qemu.on('data', (b: Buffer) => {
      got.push(b);
      size += b.length;
    });
    qemu.resume();
    await Promise.all(slices);
    while (size < input.length) await sleep(5);
    assert.ok(Buffer.concat(got).equals(input));
  });
});
