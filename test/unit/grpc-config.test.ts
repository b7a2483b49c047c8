import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadConfig } from '../../src/config.js';

test('the gRPC API listens on 9443 at the REST host by default', () => {
  const c = loadConfig({}, {});
  assert.equal(c.grpcPort, 9443);
  assert.equal(c.grpcHost, c.host);
  assert.equal(loadConfig({ host: '0.0.0.0' }, {}).grpcHost, '0.0.0.0');
});

test('HUTCH_GRPC_PORT: a port, 0 for any free one, off to disable; HUTCH_GRPC_HOST', () => {
  assert.equal(loadConfig({}, { HUTCH_GRPC_PORT: '0' }).grpcPort, 0);
  assert.equal(loadConfig({}, { HUTCH_GRPC_PORT: '19443' }).grpcPort, 19443);
  assert.equal(loadConfig({}, { HUTCH_GRPC_PORT: 'off' }).grpcPort, null);
  assert.equal(loadConfig({}, { HUTCH_GRPC_HOST: '::1' }).grpcHost, '::1');
  assert.throws(() => loadConfig({}, { HUTCH_GRPC_PORT: '70000' }), /grpcPort/);
  assert.throws(() => loadConfig({}, { HUTCH_GRPC_PORT: 'nope' }), /grpcPort/);
});
