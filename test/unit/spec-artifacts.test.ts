import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openApiDocument } from '../../src/api/openapi.js';
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
