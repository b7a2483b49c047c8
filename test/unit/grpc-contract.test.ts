import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { test } from 'node:test';
import { boxdHandlers } from '../../src/api/grpc/handlers.js';
import { loadBoxdProto, protoPath } from '../../src/api/grpc/proto.js';
import { reflectableDefinition } from '../../src/api/grpc/reflection-descriptors.js';
import { repoRoot } from '../../src/paths.js';

/** The boxd spec's copy of the proto, where the checkout has the shared specs beside it. */
const sharedProto = join(repoRoot(), '..', 'shared', 'specs', 'vm-api.proto');

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

test('reflection serves descriptors a strict client accepts: reserved ranges end-exclusive, proto3 optional marked', () => {
  const fd = createRequire(import.meta.url)('protobufjs/ext/descriptor') as {
    FileDescriptorProto: { decode(b: Buffer): unknown };
  };
  const def = reflectableDefinition(loadBoxdProto().packageDefinition);
  const bin = (def['boxd.api.v1.CreateVmRequest'] as { fileDescriptorProtos: Buffer[] })
    .fileDescriptorProtos[0];
  const file = fd.FileDescriptorProto.decode(bin as Buffer) as {
    messageType: {
      name: string;
      reservedRange: { start: number; end: number }[];
      field: Record<string, unknown>[];
    }[];
  };
  const msg = (n: string) => file.messageType.find((m) => m.name === n);
  // `reserved 3; reserved 4;` in the proto: [3,4) and [4,5) in descriptor.proto's terms.
  assert.deepEqual(
    msg('CreateVmRequest')?.reservedRange.map((r) => [r.start, r.end]),
    [
      [3, 4],
      [4, 5],
    ],
  );
  const srf = msg('SrfConfig')?.field.find((f) => f.name === 'auto_suspend_timeout_secs');
  assert.equal(srf?.proto3Optional, true);
});
