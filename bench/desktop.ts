/**
 * Desktops: create → first screenshot that shows the desktop, restored from the snapshot vs a
 * cold boot, and handed out by the warm pool (a second daemon, pool of 1; same process); screenshot latency, full and scaled for a model; input latency
 * (a pointer move, 20 typed characters), each against an exec of `true` on the same machine.
 * Medians of --runs (cold boots: --cold-runs, ~30 s each under TCG), one line per figure.
 *
 *   npm run bench:desktop [-- --runs 5 --cold-runs 3]
 */
import { parseArgs } from 'node:util';
import { decodePng } from '../src/desktop/png.js';
import { api, cleanup, poolReady, type TestDaemon } from '../test/helpers/daemon.js';
import { startDesktopDaemon } from '../test/helpers/desktop.js';
import { median } from './bench-lib.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '5' }, 'cold-runs': { type: 'string', default: '3' } },
});
const runs = Number(values.runs);
const coldRuns = Number(values['cold-runs']);

function line(name: string, value: number, unit: string, base?: number, baseName = 'baseline'): void {
  const ratio = base ? ` (${(value / base).toFixed(2)}× ${baseName})` : '';
  console.log(`${name.padEnd(62)} ${value.toFixed(unit === 'ms' ? 1 : 2)} ${unit}${ratio}`);
}

/** Whether a screenshot shows the desktop: the background colour and a window, not one flat colour. */
function showsDesktop(png: Buffer): boolean {
  const img = decodePng(png);
  const seen = new Set<number>();
  for (let i = 0; i < img.rgb.length; i += 3 * 11)
    seen.add(((img.rgb[i] ?? 0) << 16) | ((img.rgb[i + 1] ?? 0) << 8) | (img.rgb[i + 2] ?? 0));
  return seen.size > 3;
}

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = performance.now();
  const value = await fn();
  return { ms: performance.now() - t0, value };
}

async function screenshot(d: TestDaemon, id: string, query = ''): Promise<Buffer> {
  const r = await fetch(`${d.url}/v1/machines/${id}/screenshot${query}`);
  if (r.status !== 200) throw new Error(`screenshot: ${r.status} ${await r.text()}`);
  return Buffer.from(await r.arrayBuffer());
}

/** Create, then screenshots until one shows the desktop: what a user waits for. */
async function createToDesktop(
  d: TestDaemon,
  mode: 'snapshot' | 'cold' | 'pool',
): Promise<{ ms: number; id: string }> {
  const t0 = performance.now();
  const r = await api(d.url, 'POST', '/v1/machines', {
    template: 'desktop',
    ttl_seconds: 900,
    ...(mode === 'pool' ? {} : { mode }),
  });
  if (r.status !== 201) throw new Error(`create: ${r.status} ${JSON.stringify(r.body)}`);
  if (r.body.mode !== mode) throw new Error(`asked for ${mode}, got ${String(r.body.mode)}`);
  const id = r.body.id as string;
  for (;;) {
    if (showsDesktop(await screenshot(d, id))) return { ms: performance.now() - t0, id };
    if (performance.now() - t0 > 300_000) throw new Error('the desktop never showed');
  }
}

const d = await startDesktopDaemon();
try {
  const snap: number[] = [];
  const cold: number[] = [];
  for (let i = 0; i < Math.max(runs, coldRuns); i++) {
    if (i < runs) {
      const s = await createToDesktop(d, 'snapshot');
      snap.push(s.ms);
      await api(d.url, 'DELETE', `/v1/machines/${s.id}`);
    }
    if (i < coldRuns) {
      const c = await createToDesktop(d, 'cold');
      cold.push(c.ms);
      await api(d.url, 'DELETE', `/v1/machines/${c.id}`);
    }
  }
  line('create → first screenshot showing the desktop, cold boot', median(cold) / 1000, 's');
  line(
    'create → first screenshot showing the desktop, from snapshot',
    median(snap) / 1000,
    's',
    median(cold) / 1000,
    'cold',
  );

  // The warm pool's desktops (networked, like the default create) on a daemon that keeps one.
  const pd = await startDesktopDaemon({ HUTCH_POOL_SIZE: '1' });
  try {
    const pooled: number[] = [];
    for (let i = 0; i < runs; i++) {
      await poolReady(pd, 'desktop', 1, 400_000);
      const p = await createToDesktop(pd, 'pool');
      pooled.push(p.ms);
      await api(pd.url, 'DELETE', `/v1/machines/${p.id}`);
    }
    line(
      'create → first screenshot showing the desktop, from the pool',
      median(pooled) / 1000,
      's',
      median(snap) / 1000,
      'snapshot',
    );
  } finally {
    await cleanup(pd);
  }

  const m = await api(d.url, 'POST', '/v1/machines', { template: 'desktop', ttl_seconds: 900 });
  const id = m.body.id as string;
  const n = runs * 4;
  const execs: number[] = [];
  const full: number[] = [];
  const scaled: number[] = [];
  const moves: number[] = [];
  const typing: number[] = [];
  let bytesFull = 0;
  let bytesScaled = 0;
  for (let i = 0; i < n; i++) {
    execs.push((await timed(() => api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd: ['true'] }))).ms);
    const f = await timed(() => screenshot(d, id));
    full.push(f.ms);
    bytesFull = f.value.length;
    const s = await timed(() => screenshot(d, id, '?max_width=512'));
    scaled.push(s.ms);
    bytesScaled = s.value.length;
    moves.push(
      (
        await timed(() =>
          api(d.url, 'POST', `/v1/machines/${id}/input`, {
            actions: [{ type: 'move', x: 100 + i, y: 100 + i }],
          }),
        )
      ).ms,
    );
    if (i < runs)
      typing.push(
        (
          await timed(() =>
            api(d.url, 'POST', `/v1/machines/${id}/input`, {
              actions: [{ type: 'type', text: 'echo twenty-chars-ok\n' }],
            }),
          )
        ).ms,
      );
  }
  const base = median(execs);
  line('exec `true` on the desktop (baseline)', base, 'ms');
  line(`screenshot 1024x768 PNG (${(bytesFull / 1024).toFixed(0)} KiB)`, median(full), 'ms', base, 'exec');
  line(
    `screenshot scaled to 512 wide (${(bytesScaled / 1024).toFixed(0)} KiB)`,
    median(scaled),
    'ms',
    base,
    'exec',
  );
  line('input: pointer move', median(moves), 'ms', base, 'exec');
  line('input: type 21 characters (incl. newline)', median(typing), 'ms', base, 'exec');
} finally {
  await cleanup(d);
}
