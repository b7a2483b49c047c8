/**
 * The start-up sweep of leftover network namespaces (a crash, kill -9): N namespaces of this
 * daemon's tag whose machines are gone, removed by NetworkManager.sweep (one `ip -batch`),
 * against the baseline of one `ip netns del` per namespace, same process. Median of 3.
 *
 *   npm run build && node dist/bench/net-sweep.js [--count 300]
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { daemonTag } from '../src/net/addressing.js';
import { NetStore } from '../src/net/net-store.js';
import { NetworkManager } from '../src/net/network-manager.js';
import { median } from './bench-lib.js';

const { values } = parseArgs({ options: { count: { type: 'string', default: '300' } } });
const n = Number(values.count);
const dir = mkdtempSync(join(tmpdir(), 'hutch-sweep-'));
const tag = daemonTag(dir);
const store = new NetStore(join(dir, 'net.db'));
const manager = new NetworkManager(
  {
    stateDir: dir,
    pool: '10.213.0.0/16',
    uplink: '',
    maxConnections: 16,
    bytesPerSecond: 0,
    slotDir: '/run/hutch/net-slots',
  },
  store,
  () => {},
);
const names = Array.from({ length: n }, (_, i) => `hutch-${tag}-m-left${i}`);
const make = (): void => {
  execFileSync('ip', ['-batch', '-'], { input: names.map((x) => `netns add ${x}`).join('\n') });
};
const swept: number[] = [];
const oneByOne: number[] = [];
try {
  for (let r = 0; r < 3; r++) {
    make();
    let t = performance.now();
    const gone = await manager.sweep(() => false);
    swept.push(performance.now() - t);
    if (gone.length !== n) throw new Error(`swept ${gone.length} of ${n}`);
    make();
    t = performance.now();
    for (const x of names) execFileSync('ip', ['netns', 'del', x]);
    oneByOne.push(performance.now() - t);
  }
  console.log(
    `sweep of ${n} leftover namespaces (one ip -batch)`.padEnd(56),
    `${median(swept).toFixed(0)} ms`,
  );
  console.log(
    `baseline: one ip netns del per namespace`.padEnd(56),
    `${median(oneByOne).toFixed(0)} ms (sweep is ${(median(swept) / median(oneByOne)).toFixed(2)}× it)`,
  );
} finally {
  execFileSync('ip', ['-force', '-batch', '-'], {
    input: names.map((x) => `netns del ${x}`).join('\n'),
    stdio: 'ignore',
  });
  store.close();
  rmSync(dir, { recursive: true, force: true });
}
