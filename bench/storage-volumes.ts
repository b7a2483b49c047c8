/**
 * Persistent volumes benchmark against the real daemon, on the local store and on S3 (s3rver
 * on this host, test/helpers/s3-server.ts). A machine's /root of ~200 MB (5,000 files of
 * 4–40 KB and three of 30 MiB) is saved into a volume and restored into new machines; the
 * baseline is GNU tar on the same tree inside the same guest in the same run (create to a pipe,
 * extract from a file), so the ratio is what the host side (agent channel, parsing, the store)
 * costs on top of tar itself. Also volume file PUT and GET of 100 MiB. Medians of N runs.
 *
 *   npm run bench:storage [-- --runs 3] [--files-only]   (--files-only: PUT/GET only, no machines)
 */
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { api, cleanup, startDaemon, type TestDaemon } from '../test/helpers/daemon.js';
import { type S3Server, startS3Server } from '../test/helpers/s3-server.js';
import { getFileSha, putFile } from '../test/helpers/volume-client.js';
import { median } from './bench-lib.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '3' }, 'files-only': { type: 'boolean', default: false } },
});
const runs = Number(values.runs);
const MiB = 1024 * 1024;

/** Upload data made before the clock starts: the client must not be what is measured. */
const block = randomBytes(8 * MiB);
function* blocks(total: number): Generator<Buffer> {
  for (let off = 0; off < total; off += 256 * 1024) {
    const at = off % block.length;
    yield block.subarray(at, at + Math.min(256 * 1024, total - off));
  }
}

function line(name: string, value: number, unit: string, base?: number, baseName = 'guest tar'): void {
  const ratio = base ? ` (${(value / base).toFixed(2)}× ${baseName})` : '';
  console.log(`${name.padEnd(52)} ${value.toFixed(unit === 's' ? 2 : 1)} ${unit}${ratio}`);
}

async function exec(d: TestDaemon, id: string, cmd: string): Promise<string> {
  const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 900_000 });
  if (r.body.exit_code !== 0) throw new Error(`${cmd.slice(0, 80)}: ${JSON.stringify(r.body).slice(0, 400)}`);
  return String(r.body.stdout).trim();
}

async function create(d: TestDaemon, volume?: string): Promise<{ id: string; ms: number }> {
  const t = performance.now();
  const r = await api(d.url, 'POST', '/v1/machines', {
    template: 'python',
    ttl_seconds: 900,
    ...(volume ? { volume } : {}),
  });
  if (r.status !== 201) throw new Error(JSON.stringify(r.body));
  return { id: String(r.body.id), ms: performance.now() - t };
}

const makeTree = [
  'python3 -c "',
  'import os, random',
  'random.seed(7)',
  'for i in range(5000):',
  "    d = '/root/bench/d%02d' % (i % 50)",
  '    os.makedirs(d, exist_ok=True)',
  "    open('%s/f%05d' % (d, i), 'wb').write(os.urandom(random.randint(4096, 40960)))",
  'for i in range(3):',
  "    f = open('/root/bench/large%d' % i, 'wb')",
  '    [f.write(os.urandom(1048576)) for _ in range(30)]',
  '    f.close()',
  '" && du -sb /root | cut -f1',
].join('\n');

/** Milliseconds of a shell command in the guest, timed by the guest's clock. */
async function guestMs(d: TestDaemon, id: string, cmd: string): Promise<number> {
  const out = await exec(d, id, `s=$(date +%s%N); ${cmd}; e=$(date +%s%N); echo $(( (e - s) / 1000000 ))`);
  return Number(out.split('\n').pop());
}

async function bench(name: string, env: Record<string, string>): Promise<void> {
  const d = await startDaemon({ env });
  try {
    const vol = String((await api(d.url, 'POST', '/v1/volumes', {})).body.id);
    if (!values['files-only']) await machines(d, name, vol);
    await files(d, name, vol);
  } finally {
    await cleanup(d);
  }
}

async function machines(d: TestDaemon, name: string, vol: string): Promise<void> {
  {
    const a = await create(d);
    const bytes = Number(await exec(d, a.id, makeTree));
    const mb = bytes / 1e6;
    console.log(`[${name}] /root: ${mb.toFixed(1)} MB, 5003 files`);
    // Baselines: tar in the guest. (-f /dev/null would skip reading the files: GNU tar knows.)
    const tarOut: number[] = [];
    const tarIn: number[] = [];
    await exec(d, a.id, 'tar -C /root -cf /var/tmp/root.tar .');
    for (let i = 0; i < runs; i++) {
      tarOut.push(await guestMs(d, a.id, 'tar -C /root --numeric-owner -cf - . | cat > /dev/null'));
      tarIn.push(
        await guestMs(
          d,
          a.id,
          'rm -rf /var/tmp/x && mkdir /var/tmp/x && tar -C /var/tmp/x --numeric-owner -xpf /var/tmp/root.tar',
        ),
      );
    }
    await exec(d, a.id, 'rm -rf /var/tmp/x /var/tmp/root.tar');
    const saves: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t = performance.now();
      const r = await api(d.url, 'POST', `/v1/machines/${a.id}/save?volume=${vol}`);
      if (r.status !== 200) throw new Error(JSON.stringify(r.body));
      saves.push(performance.now() - t);
    }
    const plain: number[] = [];
    const withVol: number[] = [];
    for (let i = 0; i < runs; i++) {
      const p = await create(d);
      plain.push(p.ms);
      await api(d.url, 'DELETE', `/v1/machines/${p.id}`);
      const v = await create(d, vol);
      withVol.push(v.ms);
      await api(d.url, 'DELETE', `/v1/machines/${v.id}`);
    }
    const restores = withVol.map((w, i) => w - (plain[i] ?? 0));
    const s = median(saves) / 1000;
    const r = median(restores) / 1000;
    const bo = median(tarOut) / 1000;
    const bi = median(tarIn) / 1000;
    line(`[${name}] guest tar -cf - | cat (baseline)`, bo, 's');
    line(`[${name}] save (POST /save)`, s, 's', bo);
    line(`[${name}] save throughput`, mb / s, 'MB/s', mb / bo);
    line(`[${name}] guest tar -xpf (baseline)`, bi, 's');
    line(`[${name}] restore (create with volume - plain create)`, r, 's', bi);
    line(`[${name}] restore throughput`, mb / r, 'MB/s', mb / bi);
    line(`[${name}] create with volume, total`, median(withVol) / 1000, 's');
    line(`[${name}] plain create`, median(plain) / 1000, 's');
  }
}

/** Volume files, no machine involved. */
async function files(d: TestDaemon, name: string, vol: string): Promise<void> {
  {
    const size = 100 * MiB;
    const puts: number[] = [];
    const gets: number[] = [];
    for (let i = 0; i < runs; i++) {
      let t = performance.now();
      const p = await putFile(d.url, vol, `file-${i}`, blocks(size));
      if (p.status !== 200) throw new Error(JSON.stringify(p.body));
      puts.push(performance.now() - t);
      t = performance.now();
      const g = await getFileSha(d.url, vol, `file-${i}`);
      if (g.bytes !== size) throw new Error(`GET returned ${g.bytes} bytes`);
      gets.push(performance.now() - t);
    }
    line(`[${name}] file PUT 100 MiB`, size / 1e6 / (median(puts) / 1000), 'MB/s');
    line(`[${name}] file GET 100 MiB`, size / 1e6 / (median(gets) / 1000), 'MB/s');
  }
}

await bench('local', {});
let s3: S3Server | undefined;
try {
  s3 = await startS3Server();
  await bench('s3', {
    HUTCH_VOLUME_BACKEND: 's3',
    HUTCH_S3_ENDPOINT: s3.url,
    HUTCH_S3_BUCKET: s3.bucket,
    HUTCH_S3_ACCESS_KEY_ID: 'S3RVER',
    HUTCH_S3_SECRET_ACCESS_KEY: 'S3RVER',
  });
} finally {
  await s3?.stop();
}
