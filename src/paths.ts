import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The checkout the daemon runs from (recipes, the agent's sources and scripts live there). */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json')) || !existsSync(join(dir, 'agent'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('cannot find the hutch checkout (package.json + agent/)');
    dir = up;
  }
  return dir;
}
