/**
 * A real OCI registry for tests (Debian's docker-registry, distribution v2) on 127.0.0.1, and
 * small OCI images built offline with umoci from one Debian package (busybox-static).
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { imageDir } from './daemon.js';

const run = promisify(execFile);

export interface TestRegistry {
  /** host:port, e.g. 127.0.0.1:40123 */
  host: string;
  port: number;
  stop(): Promise<void>;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}

/** Starts `docker-registry serve` with storage in a fresh temporary directory; stop() removes it. */
export async function startRegistry(): Promise<TestRegistry> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-registry-'));
  const port = await freePort();
  const host = `127.0.0.1:${port}`;
  const config = join(dir, 'config.yml');
  writeFileSync(
    config,
    [
      'version: 0.1',
      'log:',
      '  level: error',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${join(dir, 'storage')}`,
      '  delete:',
      '    enabled: true',
      'http:',
      `  addr: ${host}`,
      '',
    ].join('\n'),
  );
  const proc: ChildProcess = spawn('/usr/bin/docker-registry', ['serve', config], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  proc.stderr?.on('data', (b: Buffer) => {
    err = (err + b.toString()).slice(-4000);
  });
  const stop = async (): Promise<void> => {
    if (proc.exitCode === null && proc.signalCode === null) {
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (proc.exitCode !== null) throw new Error(`docker-registry exited (${proc.exitCode}): ${err}`);
      try {
        const r = await fetch(`http://${host}/v2/`);
        if (r.status === 200) break;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`docker-registry did not answer on ${host}: ${err}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  } catch (e) {
    await stop();
    throw e;
  }
  return { host, port, stop };
}

const fixtureRecipe = 'busybox-static, applets sh ls cat, v1';

/**
 * A tiny root filesystem tree (busybox-static from Debian, ~2 MB), cached under the image dir
 * keyed by the recipe's hash so test runs after the first take no network.
 */
export async function busyboxTree(): Promise<string> {
  const key = createHash('sha256').update(fixtureRecipe).digest('hex').slice(0, 16);
  const dir = join(imageDir, 'test-fixtures', `busybox-${key}`);
  if (existsSync(join(dir, 'root', 'bin', 'busybox'))) return join(dir, 'root');
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  await run('apt-get', ['download', 'busybox-static'], { cwd: tmp });
  const deb = readdirSync(tmp).find((f) => f.endsWith('.deb'));
  if (!deb) throw new Error('apt-get download busybox-static left no .deb');
  await run('dpkg-deb', ['-x', join(tmp, deb), join(tmp, 'root')]);
  rmSync(join(tmp, deb));
  for (const applet of ['sh', 'ls', 'cat']) symlinkSync('busybox', join(tmp, 'root', 'bin', applet));
  rmSync(dir, { recursive: true, force: true });
  renameSync(tmp, dir);
  return join(dir, 'root');
}

export interface TestImageLayer {
  /** Files to add: path → content (a string), or { symlink: target }. */
  files?: Record<string, string | { symlink: string }>;
  dirs?: string[];
  /** Paths to delete from the layers below (whiteouts). */
  whiteouts?: string[];
}

/**
 * Builds an OCI image with umoci: the busybox tree as the first layer, then `layers`, then the
 * config (Env, WorkingDir), and pushes it to `dest` (docker://host/repo:tag, plain HTTP).
 */
export async function pushTestImage(
  dest: string,
  layers: TestImageLayer[],
  config: { env?: string[]; workdir?: string; architecture?: string } = {},
): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'hutch-oci-'));
  try {
    const layout = join(work, 'layout');
    const image = `${layout}:app`;
    await run('umoci', ['init', '--layout', layout]);
    await run('umoci', ['new', '--image', image]);
    await run('umoci', ['insert', '--image', image, '--no-history', await busyboxTree(), '/']);
    for (const [i, layer] of layers.entries()) {
      for (const w of layer.whiteouts ?? [])
        await run('umoci', ['insert', '--image', image, '--whiteout', w]);
      if (!layer.files && !layer.dirs) continue;
      const src = join(work, `layer-${i}`);
      mkdirSync(src);
      for (const d of layer.dirs ?? []) mkdirSync(join(src, d), { recursive: true });
      for (const [path, content] of Object.entries(layer.files ?? {})) {
        const p = join(src, path);
        mkdirSync(join(p, '..'), { recursive: true });
        if (typeof content === 'string') writeFileSync(p, content);
        else symlinkSync(content.symlink, p);
      }
      await run('umoci', ['insert', '--image', image, src, '/']);
    }
    const cfg = [
      ...(config.env ?? []).flatMap((e) => ['--config.env', e]),
      ...(config.workdir ? ['--config.workingdir', config.workdir] : []),
      ...(config.architecture ? ['--architecture', config.architecture] : []),
    ];
    if (cfg.length > 0) await run('umoci', ['config', '--image', image, ...cfg]);
    await run('skopeo', [
      'copy',
      '--insecure-policy',
      '--quiet',
      '--dest-tls-verify=false',
      `oci:${image}`,
      dest,
    ]);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
