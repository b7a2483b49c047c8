import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { boxRoutes } from '../../src/api/boxes-routes.js';
import { boxesOpenApiDocument, openApiDocument } from '../../src/api/openapi.js';
import { errorTable } from '../../src/errors.js';
import { repoRoot } from '../../src/paths.js';

const root = repoRoot();

test('spec/openapi.json is what the code generates', () => {
  const checkedIn = JSON.parse(readFileSync(join(root, 'spec', 'openapi.json'), 'utf8'));
  assert.deepEqual(checkedIn, openApiDocument());
});

test('docs/errors.md lists every error code with its HTTP status', () => {
  const doc = readFileSync(join(root, 'docs', 'errors.md'), 'utf8');
  for (const [code, e] of Object.entries(errorTable)) {
    assert.match(doc, new RegExp(`\\| \`${code}\` \\| ${e.http} \\|`), code);
  }
});

test('spec/boxes-openapi.json is what the code generates', () => {
  const checkedIn = JSON.parse(readFileSync(join(root, 'spec', 'boxes-openapi.json'), 'utf8'));
  assert.deepEqual(checkedIn, boxesOpenApiDocument());
});

test('every endpoint of the boxes spec is served', () => {
  const spec = readFileSync(join(root, '..', 'shared', 'specs', 'boxes-rest-api.txt'), 'utf8');
  // The spec's tables put "METHOD |" and "/path |" on consecutive lines; WS is a GET upgrade.
  const wanted = [...spec.matchAll(/^(GET|POST|DELETE) \|\n(\/v1\/\S+) \|/gm)].map((m) => `${m[1]} ${m[2]}`);
  const ws = /^WS (\/v1\/\S+?)\?/m.exec(spec)?.[1];
  if (ws) wanted.push(`GET ${ws}`);
  assert.ok(wanted.length >= 17, `parsed only ${wanted.length} endpoints from the spec`);
  const served = new Set(boxRoutes.map((r) => `${r.method} ${r.path}`));
  for (const w of wanted) assert.ok(served.has(w), `not served: ${w}`);
});
