import { EventEmitter } from 'node:events';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { HutchError } from '../errors.js';
import { repoRoot } from '../paths.js';
import { markUsed } from './cache-holders.js';
import { acquireFileLock } from './file-lock.js';
import { localImageDigest } from './oci.js';
import { localImageRecipes, type RootfsSpec, type TemplateRecipe, templateRecipes } from './recipes.js';
import { runCapture, runLogged } from './run-command.js';
import { fileHash, guestCmdline, contentHash as hash, makeExt4, stageGuestFiles } from './staging.js';

/** What a built template is: read by the engine to boot machines. Written last, so its presence means "complete". */
export interface TemplateManifest {
  name: string;
  hash: string;
  kernel: string;
  rootfs: string;
  /** Kernel command line without the per-host (TSC) and per-machine (hostname) parts. */
  cmdline: string;
  kernelHz: number;
  builtAt: string;
  buildSeconds: number;
}

export interface BuildProgress {
  step: 'kernel' | 'agent' | 'rootfs' | 'image';
  state: 'cached' | 'start' | 'done';
  message: string;
  seconds?: number;
}

/** Bump when assemble() changes what goes into an image, so cached templates are rebuilt. */
const assemblyVersion = '3';

/** What every hutch disk is made from besides its root filesystem: the guest kernel and the agent. */
export interface BuildParts {
  kernel: { path: string; hz: number; key: string };
  /** The agent binary as read once: hash it and write these bytes, so the two always agree. */
  agent: { path: string; bytes: Buffer; hash: string };
  /** The cached root filesystem tree, when prepare() was asked for one. */
  rootfs?: string;
}

/** The cache keys of one build of hutch (see TemplateBuilder.currentKeys). */
export interface BuildKeys {
  kernel: string;
  /** Hash of the agent binary as built now; absent when it is not built (then any agent counts). */
  agent?: string;
  /** Template name → key of templates/<name>-<key>. */
  templates: Record<string, string>;
  /** Keys of rootfs/<key>: the trees of the template recipes and of the local image recipes. */
  rootfs: string[];
  /** Digests of the local image recipes (debian:bookworm and its aliases). */
  localImages: string[];
}

/**
 * Builds templates from their recipes into a content-addressed cache:
 *   kernels/<hash>/vmlinux        hash of the kernel config + build script + linux-source version
 *   rootfs/<hash>/root/           hash of the package list + build script
 *   templates/<name>-<hash>/      hash of the kernel, rootfs, agent binary and injected files
 * Each entry is built in a temporary directory and renamed into place, so a crash mid-build never
 * leaves an entry that looks complete. A lock file serialises builders sharing one cache.
 */
export class TemplateBuilder extends EventEmitter {
  private readonly root = repoRoot();
  constructor(private readonly imageDir: string) {
    super();
  }

  private progress(p: BuildProgress): void {
    this.emit('progress', p);
  }

  /** The manifest of the current build of `name`, if it is built and matches its recipe. */
  async lookup(name: string): Promise<TemplateManifest | undefined> {
    const recipe = templateRecipes[name];
    if (!recipe) return undefined;
    const key = await this.templateKey(recipe);
    const manifestPath = join(this.imageDir, 'templates', `${name}-${key}`, 'manifest.json');
    if (!existsSync(manifestPath)) return undefined;
    markUsed(join(manifestPath, '..'));
    return JSON.parse(readFileSync(manifestPath, 'utf8')) as TemplateManifest;
  }

  /**
   * The cache keys this checkout resolves to now: what a daemon of this build would boot, so
   * the cache's garbage collector keeps it (src/images/cache-gc.ts).
   */
  async currentKeys(): Promise<BuildKeys> {
    const kernel = await this.kernelKey();
    const agentPath = join(this.root, 'agent', 'build', 'hutch-agent');
    const templates: Record<string, string> = {};
    for (const [name, recipe] of Object.entries(templateRecipes))
      templates[name] = await this.templateKey(recipe);
    const locals = Object.values(localImageRecipes);
    const rootfs = new Set([...Object.values(templateRecipes), ...locals].map((r) => this.rootfsKey(r)));
    return {
      kernel,
      ...(existsSync(agentPath) ? { agent: hash(readFileSync(agentPath)) } : {}),
      templates,
      rootfs: [...rootfs].sort(),
      localImages: [...new Set(locals.map((r) => localImageDigest(r, this.rootfsKey(r))))].sort(),
    };
  }

  async build(name: string): Promise<TemplateManifest> {
    const recipe = templateRecipes[name];
    if (!recipe) throw new HutchError('TEMPLATE_NOT_FOUND', `no template named ${JSON.stringify(name)}`);
    mkdirSync(this.imageDir, { recursive: true });
    const release = await acquireFileLock(join(this.imageDir, '.build.lock'), (holder) =>
      this.progress({ step: 'image', state: 'start', message: `waiting for another build (pid ${holder})` }),
    );
    try {
      const existing = await this.lookup(name);
      if (existing) {
        this.progress({
          step: 'image',
          state: 'cached',
          message: `template ${name} is up to date (${existing.hash})`,
        });
        return existing;
      }
      const t0 = Date.now();
      const kernel = await this.buildKernel();
      const agent = await this.buildAgent();
      const rootfs = await this.buildRootfs(recipe);
      const manifest = await this.assemble(recipe, kernel, agent, rootfs, t0);
      return manifest;
    } catch (e) {
      if (e instanceof HutchError) throw e;
      throw new HutchError(
        'TEMPLATE_BUILD_FAILED',
        `building template ${name} failed: ${(e as Error).message}`,
      );
    } finally {
      release();
    }
  }

  /**
   * The kernel and agent (and, if asked, a Debian root filesystem tree), built or taken from the
   * cache, for disks assembled elsewhere (OCI images). When everything is already built the build
   * lock is not taken, so a cache hit never waits behind someone else's long build.
   */
  async prepare(rootfs?: RootfsSpec): Promise<BuildParts> {
    const ready = await this.readyParts(rootfs);
    if (ready) return ready;
    mkdirSync(this.imageDir, { recursive: true });
    const release = await acquireFileLock(join(this.imageDir, '.build.lock'), (holder) =>
      this.progress({ step: 'image', state: 'start', message: `waiting for another build (pid ${holder})` }),
    );
    try {
      const kernel = await this.buildKernel();
      const agentPath = await this.buildAgent();
      const bytes = readFileSync(agentPath);
      return {
        kernel: { ...kernel, key: await this.kernelKey() },
        agent: { path: agentPath, bytes, hash: hash(bytes) },
        ...(rootfs ? { rootfs: await this.buildRootfs(rootfs) } : {}),
      };
    } catch (e) {
      if (e instanceof HutchError) throw e;
      throw new HutchError(
        'TEMPLATE_BUILD_FAILED',
        `building the kernel, agent or root filesystem failed: ${(e as Error).message}`,
      );
    } finally {
      release();
    }
  }

  private async readyParts(rootfs?: RootfsSpec): Promise<BuildParts | undefined> {
    const key = await this.kernelKey();
    const kdir = join(this.imageDir, 'kernels', key);
    if (!existsSync(join(kdir, 'vmlinux'))) return undefined;
    const tree = rootfs ? join(this.imageDir, 'rootfs', this.rootfsKey(rootfs), 'root') : undefined;
    if (tree && !existsSync(join(tree, 'usr', 'bin'))) return undefined;
    const agentPath = join(this.root, 'agent', 'build', 'hutch-agent');
    try {
      // `make -q` only asks: exit 0 when the binary is up to date with its sources.
      await runCapture('make', ['-q', '-C', join(this.root, 'agent'), 'build/hutch-agent']);
    } catch {
      return undefined;
    }
    const m = /^CONFIG_HZ=(\d+)/m.exec(readFileSync(join(kdir, 'config'), 'utf8'));
    const bytes = readFileSync(agentPath);
    markUsed(kdir);
    if (tree) markUsed(join(tree, '..'));
    return {
      kernel: { path: join(kdir, 'vmlinux'), hz: m ? Number(m[1]) : 100, key },
      agent: { path: agentPath, bytes, hash: hash(bytes) },
      ...(tree ? { rootfs: tree } : {}),
    };
  }

  /** The cache key of the guest kernel (its config, build script and linux-source version). */
  async kernelKey(): Promise<string> {
    const dir = join(this.root, 'images', 'kernel');
    let sourceVersion = 'unknown';
    try {
      // Default output is "name<TAB>version".
      sourceVersion =
        (await runCapture('dpkg-query', ['-W', 'linux-source-6.1'])).trim().split('\t')[1] ?? 'unknown';
    } catch {
      // not installed: the build step says so clearly
    }
    return hash(fileHash(join(dir, 'microvm.config'), join(dir, 'build-kernel.sh')), sourceVersion);
  }

  /** The cache key of a root filesystem tree built from Debian packages. */
  rootfsKey(recipe: RootfsSpec): string {
    return hash(
      fileHash(join(this.root, 'images', 'rootfs', 'build-rootfs.sh')),
      recipe.suite,
      [...recipe.packages].sort().join(','),
    );
  }

  private agentSourceKey(): string {
    const src = join(this.root, 'agent', 'src');
    const files = readdirSync(src)
      .filter((f) => /\.(c|h)$/.test(f))
      .sort()
      .map((f) => join(src, f));
    return fileHash(join(this.root, 'agent', 'Makefile'), ...files);
  }

  private async templateKey(recipe: TemplateRecipe): Promise<string> {
    return hash(
      await this.kernelKey(),
      this.rootfsKey(recipe),
      this.agentSourceKey(),
      String(recipe.diskSizeMb),
      ...(recipe.files ?? []).map((f) => `${f.guest}:${f.mode}:${fileHash(join(this.root, f.source))}`),
      JSON.stringify(recipe.startup ?? []),
      assemblyVersion,
    );
  }

  private async buildKernel(): Promise<{ path: string; hz: number }> {
    const key = await this.kernelKey();
    const dir = join(this.imageDir, 'kernels', key);
    const vmlinux = join(dir, 'vmlinux');
    const hzOf = (): number => {
      const m = /^CONFIG_HZ=(\d+)/m.exec(readFileSync(join(dir, 'config'), 'utf8'));
      return m ? Number(m[1]) : 100;
    };
    if (existsSync(vmlinux)) {
      markUsed(dir);
      this.progress({ step: 'kernel', state: 'cached', message: `kernel ${key} (cached)` });
      return { path: vmlinux, hz: hzOf() };
    }
    if (!existsSync('/usr/src/linux-source-6.1.tar.xz'))
      throw new Error('linux-source-6.1 is not installed: run scripts/setup.sh');
    const tmp = `${dir}.tmp-${process.pid}`;
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp, { recursive: true });
    const t = Date.now();
    this.progress({
      step: 'kernel',
      state: 'start',
      message: 'building the guest kernel from linux-source-6.1 (~9 min on 2 cores)',
    });
    await runLogged(
      'bash',
      [join(this.root, 'images', 'kernel', 'build-kernel.sh'), tmp],
      join(tmp, 'steps.log'),
    );
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    this.progress({
      step: 'kernel',
      state: 'done',
      message: `kernel ${key}`,
      seconds: (Date.now() - t) / 1000,
    });
    return { path: vmlinux, hz: hzOf() };
  }

  private async buildAgent(): Promise<string> {
    const t = Date.now();
    const log = join(this.imageDir, 'agent-build.log');
    writeFileSync(log, '');
    await runLogged('make', ['-C', join(this.root, 'agent'), '--no-print-directory'], log);
    const bin = join(this.root, 'agent', 'build', 'hutch-agent');
    this.progress({
      step: 'agent',
      state: 'done',
      message: `agent ${fileHash(bin)}`,
      seconds: (Date.now() - t) / 1000,
    });
    return bin;
  }

  private async buildRootfs(recipe: RootfsSpec): Promise<string> {
    const key = this.rootfsKey(recipe);
    const dir = join(this.imageDir, 'rootfs', key);
    if (existsSync(join(dir, 'root', 'usr', 'bin'))) {
      markUsed(dir);
      this.progress({ step: 'rootfs', state: 'cached', message: `root filesystem ${key} (cached)` });
      return join(dir, 'root');
    }
    const tmp = `${dir}.tmp-${process.pid}`;
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp, { recursive: true });
    const t = Date.now();
    this.progress({
      step: 'rootfs',
      state: 'start',
      message: `installing ${recipe.packages.length} Debian packages with mmdebstrap (~1 min)`,
    });
    await runLogged(
      'bash',
      [join(this.root, 'images', 'rootfs', 'build-rootfs.sh'), tmp, recipe.suite, ...recipe.packages],
      join(tmp, 'build.log'),
    );
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    this.progress({
      step: 'rootfs',
      state: 'done',
      message: `root filesystem ${key}`,
      seconds: (Date.now() - t) / 1000,
    });
    return join(dir, 'root');
  }

  private async assemble(
    recipe: TemplateRecipe,
    kernel: { path: string; hz: number },
    agentBin: string,
    rootfs: string,
    t0: number,
  ): Promise<TemplateManifest> {
    const key = await this.templateKey(recipe);
    const dir = join(this.imageDir, 'templates', `${recipe.name}-${key}`);
    const tmp = `${dir}.tmp-${process.pid}`;
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp, { recursive: true });
    const t = Date.now();
    this.progress({ step: 'image', state: 'start', message: 'assembling the root filesystem image' });
    // A hard-linked copy of the cached tree: files we add are new inodes, so the cache is never modified.
    const staging = join(tmp, 'staging');
    await runLogged('cp', ['-al', rootfs, staging], join(tmp, 'build.log'));
    const put = (rel: string, content: string | Buffer, mode: number): void => {
      const p = join(staging, rel);
      mkdirSync(join(p, '..'), { recursive: true });
      if (existsSync(p)) unlinkSync(p);
      writeFileSync(p, content, { mode });
    };
    put('sbin/hutch-agent', readFileSync(agentBin), 0o755);
    for (const f of recipe.files ?? []) put(f.guest, readFileSync(join(this.root, f.source)), f.mode);
    const skipped = stageGuestFiles(staging);
    if (skipped.length > 0) throw new Error(`cannot write ${skipped.join(', ')} into the root filesystem`);
    mkdirSync(join(staging, 'root'), { recursive: true, mode: 0o700 });
    await makeExt4(staging, join(tmp, 'rootfs.ext4'), recipe.diskSizeMb, join(tmp, 'build.log'));
    rmSync(staging, { recursive: true, force: true });
    copyFileSync(kernel.path, join(tmp, 'vmlinux'));
    const manifest: TemplateManifest = {
      name: recipe.name,
      hash: key,
      kernel: join(dir, 'vmlinux'),
      rootfs: join(dir, 'rootfs.ext4'),
      cmdline: guestCmdline('/sbin/hutch-agent'),
      kernelHz: kernel.hz,
      builtAt: new Date().toISOString(),
      buildSeconds: Math.round((Date.now() - t0) / 100) / 10,
    };
    writeFileSync(join(tmp, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    this.progress({
      step: 'image',
      state: 'done',
      message: `template ${recipe.name} ${key}`,
      seconds: (Date.now() - t) / 1000,
    });
    return manifest;
  }
}
