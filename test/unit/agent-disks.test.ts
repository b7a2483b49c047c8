// Attachable disks over the agent protocol (docs/agent-protocol.md, "Disks"): the frames
// mountDisk and unmountDisk send, how their answers settle, the refusal without the `disks`
// feature, and the real agent's checks (--connect: it validates, then refuses with EOPNOTSUPP,
// because on a test host SCSI target T is one of that host's disks). The real mount and unmount
// run in agent/test/pid1-smoke.py (PID 1 of a namespace, a loop device posing as the disk).

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { type AgentConnection, AgentError, AgentTimeoutError } from '../../src/guest/agent-connection.js';
import {
  ALL_FEATURES,
  canonicalText,
  DiskMountTag,
  DiskUnmountTag,
  decodeFrame,
  decodeMessage,
  encodeFrame,
  encodeTlv,
  Feature,
  FrameType,
  LEGACY_FEATURES,
  PROTOCOL_VERSION,
  writeUint,
} from '../../src/guest/protocol.js';
import { encodeDiskMount, encodeDiskUnmount } from '../../src/guest/protocol-messages.js';
import { AgentProcess, FakeAgent } from '../helpers/agent-harness.js';

const isAgentError =
  (code: string, message?: RegExp) =>
  (e: unknown): boolean =>
    e instanceof AgentError && e.code === code && (message === undefined || message.test(e.agentMessage));

const done = (stream: number, size?: bigint): Buffer =>
  encodeFrame(
    FrameType.DONE,
    stream,
    size === undefined ? Buffer.alloc(0) : encodeTlv([{ tag: 0x01, value: writeUint(size, 8) }]),
  );

const error = (stream: number, code: string, message: string): Buffer =>
  encodeFrame(
    FrameType.ERROR,
    stream,
    encodeTlv([
      { tag: 0x01, value: Buffer.from(code) },
      { tag: 0x02, value: Buffer.from(message) },
    ]),
  );

describe('disk frames', () => {
  it('encode DISK_MOUNT and DISK_UNMOUNT with the documented tags', () => {
    const mount = encodeDiskMount(5, { target: 3, path: '/mnt/data', readOnly: false });
    assert.equal(
      mount.toString('hex'),
      '0000001a2a000000050100000002000302000000092f6d6e742f64617461',
      'the bytes of vector disk-mount (stream 5)',
    );
    assert.equal(canonicalText(decodeFrame(mount)), 'DISK_MOUNT stream=5 target=3 path="/mnt/data"');
    const ro = encodeDiskMount(6, { target: 255, path: '/srv/ré f', readOnly: true });
    assert.equal(
      canonicalText(decodeFrame(ro)),
      'DISK_MOUNT stream=6 target=255 path="/srv/r\\xc3\\xa9 f" read_only=1',
    );
    const fields = decodeMessage(decodeFrame(ro)).fields.map((f) => f.tag);
    assert.deepEqual(fields, [DiskMountTag.TARGET, DiskMountTag.PATH, DiskMountTag.READ_ONLY]);
    const unmount = encodeDiskUnmount(7, { target: 0, path: '/mnt/data' });
    assert.equal(canonicalText(decodeFrame(unmount)), 'DISK_UNMOUNT stream=7 path="/mnt/data" target=0');
    assert.deepEqual(
      decodeMessage(decodeFrame(unmount)).fields.map((f) => f.tag),
      [DiskUnmountTag.PATH, DiskUnmountTag.TARGET],
    );
  });

  it('refuse what cannot go on the wire: a target outside 0–255, a NUL in the path', () => {
    for (const target of [-1, 256, 65535, 1.5, Number.NaN]) {
      assert.throws(() => encodeDiskMount(1, { target, path: '/d', readOnly: false }), RangeError);
      assert.throws(() => encodeDiskUnmount(1, { target, path: '/d' }), RangeError);
    }
    assert.throws(() => encodeDiskMount(1, { target: 1, path: '/a\0b', readOnly: false }), TypeError);
    assert.throws(() => encodeDiskUnmount(1, { target: 1, path: '/a\0b' }), TypeError);
  });

  it('are gated by feature bit 10, which this host announces', () => {
    assert.equal(Feature.disks, 1n << 10n);
    assert.equal(ALL_FEATURES & Feature.disks, Feature.disks);
  });
});

describe('mountDisk and unmountDisk against a fake agent', () => {
  it('send one request each and settle on DONE (the size) or ERROR (AgentError)', async () => {
    const fake = await FakeAgent.start({ hello: { version: PROTOCOL_VERSION, features: ALL_FEATURES } });
    try {
      const mounted = fake.conn.mountDisk({ target: 2, path: '/data', readOnly: true });
      const m = await fake.next(FrameType.DISK_MOUNT);
      assert.equal(canonicalText(m), `DISK_MOUNT stream=${m.stream} target=2 path="/data" read_only=1`);
      fake.send(done(m.stream, 10n << 30n));
      assert.deepEqual(await mounted, { sizeBytes: 10 * 2 ** 30 });

      const busy = fake.conn.mountDisk({ target: 2, path: '/data', readOnly: false });
      const b = await fake.next(FrameType.DISK_MOUNT);
      fake.send(error(b.stream, 'EBUSY', 'disk mount: something is mounted at /data already'));
      await assert.rejects(busy, isAgentError('EBUSY', /mounted at \/data/));

      const unmounted = fake.conn.unmountDisk({ target: 2, path: '/data' });
      const u = await fake.next(FrameType.DISK_UNMOUNT);
      assert.equal(canonicalText(u), `DISK_UNMOUNT stream=${u.stream} path="/data" target=2`);
      fake.send(error(u.stream, 'EBUSY', 'disk unmount: files are open under /data'));
      await assert.rejects(
        unmounted,
        (e: unknown) => isAgentError('EBUSY')(e) && /^disk unmount: /.test((e as Error).message),
      );

      const again = fake.conn.unmountDisk({ target: 2, path: '/data' });
      const a = await fake.next(FrameType.DISK_UNMOUNT);
      fake.send(done(a.stream));
      assert.equal(await again, undefined);
      assert.equal(fake.conn.stats.openStreams, 0);
    } finally {
      await fake.stop();
    }
  });

  it('time out on the host and cancel the stream', async () => {
    const fake = await FakeAgent.start({ hello: { version: PROTOCOL_VERSION, features: ALL_FEATURES } });
    try {
      const p = fake.conn.mountDisk({ target: 1, path: '/d', readOnly: false }, 100);
      const m = await fake.next(FrameType.DISK_MOUNT);
      await assert.rejects(p, AgentTimeoutError);
      const c = await fake.next(FrameType.CANCEL);
      assert.equal(c.stream, m.stream);
    } finally {
      await fake.stop();
    }
  });

  it('are refused with EOPNOTSUPP before anything is sent to an agent without `disks`', async () => {
    const fake = await FakeAgent.start({
      hello: { version: PROTOCOL_VERSION, features: ALL_FEATURES & ~Feature.disks },
    });
    try {
      await assert.rejects(
        fake.conn.mountDisk({ target: 1, path: '/d', readOnly: false }),
        isAgentError('EOPNOTSUPP', /cannot attach disks/),
      );
      await assert.rejects(fake.conn.unmountDisk({ target: 1, path: '/d' }), isAgentError('EOPNOTSUPP'));
      await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(fake.received, []);
    } finally {
      await fake.stop();
    }
    const legacy = await FakeAgent.start({ hello: { version: 2, features: LEGACY_FEATURES } });
    try {
      await assert.rejects(
        legacy.conn.mountDisk({ target: 1, path: '/d', readOnly: false }),
        isAgentError('EOPNOTSUPP'),
      );
    } finally {
      await legacy.stop();
    }
  });
});

describe('disk requests against the real agent (--connect: checked, never applied)', {
  timeout: 30000,
}, () => {
  let agent: AgentProcess;
  let conn: AgentConnection;

  before(async () => {
    agent = await AgentProcess.start();
    conn = await agent.connect();
  });

  after(async () => {
    conn.close();
    await agent.stop();
  });

  it('announces `disks`', () => {
    assert.ok(conn.supports('disks'));
  });

  it('answers a valid request EOPNOTSUPP: only the guest init attaches disks', async () => {
    await assert.rejects(
      conn.mountDisk({ target: 3, path: '/mnt/data', readOnly: false }),
      isAgentError('EOPNOTSUPP', /only the guest's init/),
    );
    await assert.rejects(conn.unmountDisk({ target: 3, path: '/mnt/data' }), isAgentError('EOPNOTSUPP'));
  });

  it('rejects a bad path with EINVAL', async () => {
    for (const path of [
      '',
      '/',
      'rel/x',
      '/a/..',
      '/a/../b',
      '/a/./b',
      '/a//b',
      '/a/',
      `/${'a'.repeat(255)}`,
    ]) {
      await assert.rejects(
        conn.mountDisk({ target: 1, path, readOnly: false }),
        isAgentError('EINVAL', /^disk mount: /),
        JSON.stringify(path),
      );
      await assert.rejects(conn.unmountDisk({ target: 1, path }), isAgentError('EINVAL', /^disk unmount: /));
    }
  });
});
