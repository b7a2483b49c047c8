#!/usr/bin/env node
// Generates the checked-in artifacts from the code: spec/openapi.json (from the route table and
// zod schemas) and docs/errors.md (from the error table). `--check` fails if either is stale, so
// CI catches an API change that did not update its documents.
import { readFileSync, writeFileSync } from 'node:fs';
import { boxesOpenApiDocument, openApiDocument } from '../dist/src/api/openapi.js';
import { errorTable } from '../dist/src/errors.js';

const check = process.argv.includes('--check');
const outputs = {
  'spec/openapi.json': `${JSON.stringify(openApiDocument(), null, 2)}\n`,
  'spec/boxes-openapi.json': `${JSON.stringify(boxesOpenApiDocument(), null, 2)}\n`,
  'docs/errors.md': [
    '# Error codes',
    '',
    'Generated from `src/errors.ts` by `node scripts/gen-spec.js`; do not edit by hand.',
    'Every error body is `{"code","message"}`. Codes are a contract: never renamed or reused.',
    '',
    '| code | HTTP | gRPC | meaning |',
    '|---|---|---|---|',
    ...Object.entries(errorTable).map(([code, e]) => `| \`${code}\` | ${e.http} | ${e.grpc} | ${e.doc} |`),
    '',
  ].join('\n'),
};
let stale = 0;
for (const [path, content] of Object.entries(outputs)) {
  let current = '';
  try {
    current = readFileSync(path, 'utf8');
  } catch {
    // missing: stale
  }
  if (current === content) continue;
  if (check) {
    console.error(`${path} is out of date: run \`npm run build && node scripts/gen-spec.js\``);
    stale++;
  } else {
    writeFileSync(path, content);
    console.log(`wrote ${path}`);
  }
}
process.exit(stale ? 1 : 0);
