import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isHutchError } from '../../src/errors.js';
import { defaultInsecureRegistries, isInsecureRegistry, parseImageRef } from '../../src/images/oci.js';

test('parseImageRef normalises references and rejects malformed ones', () => {
  const c = (r: string): string => parseImageRef(r).canonical;
  assert.equal(c('debian'), 'docker.io/library/debian:latest');
  assert.equal(c('debian:bookworm'), 'docker.io/library/debian:bookworm');
  assert.equal(c('docker.io/debian:12'), 'docker.io/library/debian:12');
  assert.equal(c('index.docker.io/library/debian'), 'docker.io/library/debian:latest');
  assert.equal(c('team/app'), 'docker.io/team/app:latest');
  assert.equal(c('localhost:5000/team/app:1'), 'localhost:5000/team/app:1');
  assert.equal(c('localhost/app'), 'localhost/app:latest');
  assert.equal(c('ghcr.io/o/r/x:v1.2_3'), 'ghcr.io/o/r/x:v1.2_3');
  const d = `sha256:${'a'.repeat(64)}`;
  assert.deepEqual(parseImageRef(`127.0.0.1:5000/a/b@${d}`), {
    registry: '127.0.0.1:5000',
    repository: 'a/b',
    digest: d,
    canonical: `127.0.0.1:5000/a/b@${d}`,
  });
  assert.equal(parseImageRef(`debian:12@${d}`).tag, '12');
  for (const bad of [
    '',
    'Debian',
    'team/App:1',
    'debian:bad tag',
    'debian:',
    ':1',
    'a//b',
    '/a',
    'a/',
    '-rf',
    'debian@sha256:abc',
    `debian@md5:${'a'.repeat(32)}`,
    'localhost:5000/',
    'exa mple.com/a',
    'a__-b',
    `x/${'a'.repeat(300)}`,
    'debian:bookworm\n',
  ])
    assert.throws(
      () => parseImageRef(bad),
      (e: unknown) => isHutchError(e) && e.code === 'INVALID_ARGUMENT',
      JSON.stringify(bad),
    );
});

test('insecure registries: a bare host matches any port, host:port only itself', () => {
  const d = defaultInsecureRegistries;
  assert.ok(isInsecureRegistry('localhost:5000', d));
  assert.ok(isInsecureRegistry('127.0.0.1:40123', d));
  assert.ok(isInsecureRegistry('localhost', d));
  assert.ok(!isInsecureRegistry('docker.io', d));
  assert.ok(!isInsecureRegistry('localhost.example.com:5000', d));
  assert.ok(!isInsecureRegistry('127.0.0.10:5000', d));
  assert.ok(isInsecureRegistry('reg.lan:5000', ['reg.lan:5000']));
  assert.ok(!isInsecureRegistry('reg.lan:5001', ['reg.lan:5000']));
});
