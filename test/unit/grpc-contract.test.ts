import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { boxdHandlers } from '../../src/api/grpc/handlers.js';
import { loadBoxdProto, protoPath } from '../../src/api/grpc/proto.js';
import { unservedRpcNames } from '../../src/api/grpc/unserved.js';

/** The boxd spec's copy of the proto, where the checkout has the shared specs beside it. */
const sharedProto = '/work/shared/specs/vm-api.proto';

test('the handler table implements exactly the methods of boxd.api.v1.BoxdApi', () => {
  const methods = Object.keys(loadBoxdProto().service).sort();
  const handled = Object.keys(boxdHandlers).sort();
  assert.ok(methods.length >= 40, `the proto has ${methods.length} methods`);
  assert.deepEqual(
    handled.filter((m) => !methods.includes(m)),
    [],
    'handlers for methods the proto does not have',
  );
  assert.deepEqual(
    methods.filter((m) => !handled.includes(m)),
    [],
    'methods of the proto without a handler',
  );
});

test('each handler has the streaming shape its method has in the proto', () => {
  const service = loadBoxdProto().service;
  for (const [name, def] of Object.entries(service)) {
    const kind = def.requestStream
      ? def.responseStream
        ? 'bidi'
        : 'clientStream'
      : def.responseStream
        ? 'serverStream'
        : 'unary';
    assert.equal(boxdHandlers[name]?.kind, kind, name);
  }
});

test('the unserved RPCs are networks and disks, and methods of the proto', () => {
  const methods = Object.keys(loadBoxdProto().service);
  for (const name of [...unservedRpcNames.networks, ...unservedRpcNames.disks])
    assert.ok(methods.includes(name), name);
});

test('spec/vm-api.proto is the spec’s proto byte for byte (when the spec is at hand)', (t) => {
  if (!existsSync(sharedProto)) {
    t.skip(`${sharedProto} is not here (a clone without the shared specs); the method check above guards`);
    return;
  }
  assert.ok(
    readFileSync(protoPath).equals(readFileSync(sharedProto)),
    'spec/vm-api.proto differs from the spec',
  );
});
