import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { clientBoxesEndpoint, loadConfig } from '../../src/config.js';
import { clampTtl } from '../../src/engine/engine.js';

describe('config', () => {
  test('the CLI finds the boxes API: --socket > --url > environment > the default socket', () => {
    const env = { HUTCH_BOXES_SOCKET: '/run/b.sock', HUTCH_BOXES_URL: 'http://127.0.0.1:9' };
    assert.deepEqual(clientBoxesEndpoint({ socket: '/tmp/s.sock', url: 'http://h:1' }, env), {
      socketPath: '/tmp/s.sock',
    });
    assert.deepEqual(clientBoxesEndpoint({ url: 'http://h:1' }, env), { url: 'http://h:1' });
    assert.deepEqual(clientBoxesEndpoint({}, env), { socketPath: '/run/b.sock' });
    assert.deepEqual(clientBoxesEndpoint({}, { ...env, HUTCH_BOXES_SOCKET: 'off' }), {
      url: 'http://127.0.0.1:9',
    });
    assert.deepEqual(clientBoxesEndpoint({}, { HUTCH_STATE_DIR: '/srv/h' }), {
      socketPath: '/srv/h/boxes.sock',
    });
    assert.deepEqual(clientBoxesEndpoint({}, {}), { socketPath: '/var/lib/hutch/boxes.sock' });
  });

  test('flags beat environment, environment beats defaults', () => {
    const c = loadConfig({ port: 9000 }, { HUTCH_PORT: '7000', HUTCH_MAX_MACHINES: '3' }, undefined);
    assert.equal(c.port, 9000);
    assert.equal(c.maxMachines, 3);
    assert.equal(c.host, '127.0.0.1');
    assert.equal(c.imageDir, '/var/lib/hutch/images');
  });
  test('HUTCH_ALLOW_PERSISTENT=1 allows persistent machines; default refuses', () => {
    assert.equal(loadConfig({}, {}, undefined).allowPersistent, false);
    assert.equal(loadConfig({}, { HUTCH_ALLOW_PERSISTENT: '1' }, undefined).allowPersistent, true);
  });
  test('a bad value is a clear startup error', () => {
    assert.throws(() => loadConfig({}, { HUTCH_ACCEL: 'warp' }, undefined), /accel/);
    assert.throws(() => loadConfig({}, { HUTCH_PORT: 'eighty' }, undefined), /port/);
  });
});

describe('ttl', () => {
  test('is clamped to 15–900 with a default of 60', () => {
    assert.equal(clampTtl(undefined), 60);
    assert.equal(clampTtl(1), 15);
    assert.equal(clampTtl(100), 100);
    assert.equal(clampTtl(10_000), 900);
  });
});
