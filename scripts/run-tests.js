#!/usr/bin/env node
// Runs the whole suite: builds the templates and the debian:bookworm image once into the shared
// image cache (every daemon the tests start reuses them), then runs unit and integration tests
// with node's test runner, one file at a time (the VM tests share 2 cores; running them side by
// side only makes each slower).
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

const imageDir = process.env.HUTCH_IMAGE_DIR ?? '/var/lib/hutch/images';
const env = { ...process.env, HUTCH_IMAGE_DIR: imageDir };
const only = process.argv.slice(2);

// Both templates: the desktop tests' daemons would otherwise build it inside their start.
const build = spawnSync('node', ['bin/hutch.js', 'template', 'build', 'python', 'desktop'], {
  stdio: 'inherit',
  env,
});
if (build.status !== 0) {
  console.error('template build failed');
  process.exit(1);
}
// The boxes tests' image, built (or pulled) here rather than inside the first test's request.
const pull = spawnSync('node', ['bin/hutch.js', 'image', 'pull', 'debian:bookworm'], {
  stdio: 'inherit',
  env,
});
if (pull.status !== 0) {
  console.error('image pull failed');
  process.exit(1);
}

const files = [];
// hostile/: the hostile-client and hostile-guest suite (each file prints `N tried, N held`).
for (const dir of ['dist/test/unit', 'dist/test/integration', 'dist/test/hostile']) {
  if (!existsSync(dir)) continue;
  for (const f of readdirSync(dir).sort()) {
    if (f.endsWith('.test.js') && (only.length === 0 || only.some((o) => f.includes(o))))
      files.push(join(dir, f));
  }
}
const r = spawnSync('node', ['--test', '--test-concurrency=1', ...files], {
  stdio: 'inherit',
  env,
});
process.exit(r.status ?? 1);
