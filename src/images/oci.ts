import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { HutchError } from '../errors.js';
import type { BuildParts, TemplateBuilder, TemplateManifest } from './builder.js';
import { markUsed } from './cache-holders.js';
import { type ImageRef, isInsecureRegistry, parseImageRef } from './image-ref.js';
import { type LocalImageRecipe, localImageRecipes } from './recipes.js';
import { runCaptureBytes, runLogged } from './run-command.js';
import {
  contentHash,
  guestCmdline,
  makeExt4,
  stageFreshTopDir,
  stageGuestFiles,
  stagePut,
  stageTopDir,
  treeUsage,
} from './staging.js';

export { defaultInsecureRegistries, type ImageRef, isInsecureRegistry, parseImageRef } from './image-ref.js';

/** A root disk made from an OCI image (pulled, or built locally from Debian packages). */
export interface ImageManifest extends TemplateManifest {
  /** The reference as the user wrote it. */
  ref: string;
  /** Normalised, e.g. docker.io/library/debian:bookworm, localhost:5000/team/app:1. */
  canonical: string;
  /** sha256:… of the image manifest in the registry, or of the local recipe for local builds. */
  digest: string;
  /** The image config's Env (K=V), [] if none. */
  env: string[];
  /** The image config's WorkingDir. */
  workdir: string | null;
  source: 'registry' | 'local';
  /** Size of the ext4 file in `rootfs`. */
  diskSizeMb: number;
}

export interface ImageStoreOptions {
  /** Registries spoken to over plain HTTP or unverified TLS: `host` (any port) or `host:port`. */
  insecureRegistries: readonly string[];
  builder: TemplateBuilder;
  log?: (msg: string) => void;
}

/** Where the agent lives in every image disk: a top-level directory hutch recreates itself. */
export const imageAgentPath = '/.hutch/hutch-agent';

/** Bump when assembly changes what goes into a disk, so cached disks are rebuilt (pulls are kept). */
const ociAssemblyVersion = '2';

const pullTimeout = '30m';
const inspectTimeout = '60s';

interface ImageConfig {
  env: string[];
  workdir: string | null;
}

/** What a pull leaves in the cache: the unpacked tree and the config we need from the image. */
interface PulledImage extends ImageConfig {
  digest: string;
  canonical: string;
  architecture: string;
  pulledAt: string;
}

export const digestHex = (digest: string): string => digest.slice('sha256:'.length);

/** The digest a local image recipe stands for: its root filesystem tree and its Env. */
export function localImageDigest(recipe: LocalImageRecipe, rootfsKey: string): string {
  return `sha256:${createHash('sha256')
    .update(JSON.stringify({ rootfs: rootfsKey, env: recipe.env }))
    .digest('hex')}`;
}

/** The name of the disk under oci/disks/ made from `digest` with this agent and kernel. */
export function imageDiskName(digest: string, agentHash: string, kernelKey: string): string {
  return `${digestHex(digest).slice(0, 16)}-${contentHash(digest, agentHash, kernelKey, ociAssemblyVersion)}`;
}

/**
 * OCI images → bootable root disks, cached under `imageDir/oci`:
 *   refs/<hash of canonical ref>.json   the digest the ref last resolved to (used when offline)
 *   pulls/<digest hex>/rootfs/          the unpacked image (umoci applies layers and whiteouts)
 *   disks/<digest hex 16>-<key>/        rootfs.ext4 + manifest.json, the key covering the digest,
 *                                       agent binary, kernel and assembly version
 * Like templates, each entry is built in a temporary directory and renamed into place; the
 * manifest is written last. The image is hostile: its tree is copied (hard links) into a staging
 * directory where nothing follows its symlinks (see staging.ts).
 */
export class ImageStore {
  private readonly dir: string;
  private readonly jobs = new Map<string, Promise<ImageManifest>>();
  private readonly builder: TemplateBuilder;
  private readonly insecure: readonly string[];
  private readonly log: (msg: string) => void;

  constructor(imageDir: string, opts: ImageStoreOptions) {
    this.dir = join(imageDir, 'oci');
    this.builder = opts.builder;
    this.insecure = opts.insecureRegistries;
    this.log = opts.log ?? (() => {});
  }

  /** Pulls (or builds locally) and caches by digest; concurrent calls for one ref share one job. */
  async resolve(ref: string): Promise<ImageManifest> {
    const parsed = parseImageRef(ref);
    let job = this.jobs.get(parsed.canonical);
    if (!job) {
      job = this.run(parsed).finally(() => this.jobs.delete(parsed.canonical));
      this.jobs.set(parsed.canonical, job);
    }
    // One disk can be reached by several names (tags of one digest, aliases of a local recipe):
    // the manifest on disk carries the first; the caller gets the names it used.
    return { ...(await job), ref, canonical: parsed.canonical };
  }

  /** Loads a manifest written earlier (the engine stores its path), or undefined if gone. */
  load(manifestPath: string): ImageManifest | undefined {
    try {
      const m = JSON.parse(readFileSync(manifestPath, 'utf8')) as ImageManifest;
      if (typeof m.rootfs !== 'string' || typeof m.kernel !== 'string') return undefined;
      return existsSync(m.rootfs) && existsSync(m.kernel) ? m : undefined;
    } catch {
      return undefined;
    }
  }

  private async run(ref: ImageRef): Promise<ImageManifest> {
    const t0 = Date.now();
    this.makeDirs();
    const local = ref.digest ? undefined : localImageRecipes[ref.canonical];
    if (local) {
      const digest = localImageDigest(local, this.builder.rootfsKey(local));
      const parts = await this.builder.prepare(local);
      const config = { env: local.env, workdir: null };
      return this.assemble(ref, digest, 'local', parts.rootfs!, config, parts, t0);
    }
    const digest = ref.digest ?? (await this.resolveDigest(ref));
    const pulled = await this.pull(ref, digest);
    if (!ref.digest) this.recordDigest(ref, digest);
    const parts = await this.builder.prepare();
    return this.assemble(ref, digest, 'registry', pulled.rootfs, pulled, parts, t0);
  }

  /**
   * Unpacked images hold whatever the image put there (setuid binaries, device nodes with loose
   * modes), so pulls/ is root's alone; disks/ only ever publishes ext4 files and manifests, which
   * QEMU's unprivileged user must read, and builds them in 0700 temporary directories.
   */
  private makeDirs(): void {
    for (const [sub, mode] of [
      ['', 0o755],
      ['pulls', 0o700],
      ['disks', 0o755],
      ['refs', 0o755],
    ] as const) {
      const d = join(this.dir, sub);
      mkdirSync(d, { recursive: true, mode });
      chmodSync(d, mode);
    }
  }

  private isInsecure(registry: string): boolean {
    return isInsecureRegistry(registry, this.insecure);
  }

  private refsPath(ref: ImageRef): string {
    return join(this.dir, 'refs', `${contentHash(ref.canonical)}.json`);
  }

  /** The digest a tag points to now; when the registry cannot be reached, the one it had last time. */
  private async resolveDigest(ref: ImageRef): Promise<string> {
    const args = [
      '--command-timeout',
      inspectTimeout,
      'inspect',
      '--raw',
      ...(this.isInsecure(ref.registry) ? ['--tls-verify=false'] : []),
      `docker://${ref.canonical}`,
    ];
    let raw: Buffer;
    try {
      raw = await runCaptureBytes('skopeo', args);
    } catch (e) {
      const err = registryError(ref, (e as Error).message);
      if (err.code === 'IMAGE_PULL_FAILED') {
        const known = this.knownDigest(ref);
        if (known) {
          this.log(`registry unreachable for ${ref.canonical}; using the digest it had before, ${known}`);
          return known;
        }
      }
      throw err;
    }
    // The registry addresses a manifest by the sha256 of its exact bytes.
    return `sha256:${createHash('sha256').update(raw).digest('hex')}`;
  }

  /** Remembers what a tag resolved to, once its image is pulled, for resolving it offline. */
  private recordDigest(ref: ImageRef, digest: string): void {
    const refs = this.refsPath(ref);
    const tmp = `${refs}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    writeFileSync(
      tmp,
      `${JSON.stringify({ canonical: ref.canonical, digest, at: new Date().toISOString() })}\n`,
    );
    renameSync(tmp, refs);
  }

  private knownDigest(ref: ImageRef): string | undefined {
    try {
      const r = JSON.parse(readFileSync(this.refsPath(ref), 'utf8')) as {
        canonical?: string;
        digest?: string;
      };
      return r.canonical === ref.canonical && typeof r.digest === 'string' ? r.digest : undefined;
    } catch {
      return undefined;
    }
  }

  /** The unpacked image for `digest`, pulled and unpacked unless cached. */
  private async pull(ref: ImageRef, digest: string): Promise<PulledImage & { rootfs: string }> {
    const dir = join(this.dir, 'pulls', digestHex(digest));
    const infoPath = join(dir, 'image.json');
    if (existsSync(infoPath)) {
      markUsed(dir);
      this.log(`image ${ref.canonical} (${digest}) is already pulled`);
      return { ...(JSON.parse(readFileSync(infoPath, 'utf8')) as PulledImage), rootfs: join(dir, 'rootfs') };
    }
    const tmp = `${dir}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    mkdirSync(tmp, { mode: 0o700 });
    try {
      const t = Date.now();
      const layout = join(tmp, 'layout');
      const log = join(tmp, 'pull.log');
      const source = `docker://${ref.registry}/${ref.repository}@${digest}`;
      this.log(`pulling ${ref.canonical} (${digest})`);
      try {
        await runLogged(
          'skopeo',
          [
            '--command-timeout',
            pullTimeout,
            'copy',
            '--insecure-policy',
            '--quiet',
            ...(this.isInsecure(ref.registry) ? ['--src-tls-verify=false'] : []),
            source,
            `oci:${layout}:image`,
          ],
          log,
        );
      } catch (e) {
        throw registryError(ref, (e as Error).message);
      }
      const config = readImageConfig(layout);
      if (config.architecture !== 'amd64')
        throw new HutchError(
          'IMAGE_PULL_FAILED',
          `image ${ref.canonical} is for ${config.architecture}, not amd64`,
        );
      const bundle = join(tmp, 'bundle');
      try {
        await runLogged('umoci', ['unpack', '--image', `${layout}:image`, bundle], log);
      } catch (e) {
        throw new HutchError(
          'IMAGE_PULL_FAILED',
          `unpacking ${ref.canonical} failed: ${tail((e as Error).message)}`,
        );
      }
      renameSync(join(bundle, 'rootfs'), join(tmp, 'rootfs'));
      rmSync(bundle, { recursive: true, force: true });
      rmSync(layout, { recursive: true, force: true });
      const info: PulledImage = {
        digest,
        canonical: ref.canonical,
        architecture: config.architecture,
        env: config.env,
        workdir: config.workdir,
        pulledAt: new Date().toISOString(),
      };
      writeFileSync(join(tmp, 'image.json'), `${JSON.stringify(info, null, 2)}\n`);
      publish(tmp, dir);
      this.log(`pulled and unpacked ${ref.canonical} in ${((Date.now() - t) / 1000).toFixed(1)} s`);
      return { ...info, rootfs: join(dir, 'rootfs') };
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }

  private async assemble(
    ref: ImageRef,
    digest: string,
    source: 'registry' | 'local',
    tree: string,
    config: ImageConfig,
    parts: BuildParts,
    t0: number,
  ): Promise<ImageManifest> {
    const name = imageDiskName(digest, parts.agent.hash, parts.kernel.key);
    const key = name.slice(17);
    const dir = join(this.dir, 'disks', name);
    const manifestPath = join(dir, 'manifest.json');
    const cached = this.load(manifestPath);
    if (cached) {
      markUsed(dir);
      this.log(`disk for ${ref.canonical} is up to date (${key})`);
      return cached;
    }
    const tmp = `${dir}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    mkdirSync(tmp, { mode: 0o700 });
    try {
      const t = Date.now();
      const log = join(tmp, 'build.log');
      // A hard-linked copy: what we add are new inodes, so the cached tree is never modified.
      const staging = join(tmp, 'staging');
      await runLogged('cp', ['-al', tree, staging], log);
      const agentDir = stageFreshTopDir(staging, '.hutch', 0o755);
      writeFileSync(join(agentDir, 'hutch-agent'), parts.agent.bytes, { mode: 0o755, flag: 'wx' });
      for (const [name, mode] of [
        ['root', 0o700],
        ['tmp', 0o1777],
        ['proc', 0o555],
        ['sys', 0o555],
        ['dev', 0o755],
        ['run', 0o755],
      ] as const)
        stageTopDir(staging, name, mode);
      const skipped = stageGuestFiles(staging);
      if (skipped.length > 0)
        this.log(`image ${ref.canonical}: left ${skipped.join(', ')} alone (a parent is not a directory)`);
      if (!stagePut(staging, '.hutch/image.json', `${JSON.stringify({ digest, ...config })}\n`, 0o444))
        throw new Error('cannot write /.hutch/image.json');
      const usage = await treeUsage(staging);
      const contentMb = Math.ceil(usage.kib / 1024);
      const diskSizeMb = Math.max(1024, 2 * contentMb);
      await makeExt4(staging, join(tmp, 'rootfs.ext4'), diskSizeMb, log, usage.inodes * 2);
      rmSync(staging, { recursive: true, force: true });
      const manifest: ImageManifest = {
        name: ref.canonical,
        hash: key,
        kernel: parts.kernel.path,
        rootfs: join(dir, 'rootfs.ext4'),
        cmdline: guestCmdline(imageAgentPath),
        kernelHz: parts.kernel.hz,
        builtAt: new Date().toISOString(),
        buildSeconds: Math.round((Date.now() - t0) / 100) / 10,
        ref: ref.canonical,
        canonical: ref.canonical,
        digest,
        env: config.env,
        workdir: config.workdir,
        source,
        diskSizeMb,
      };
      writeFileSync(join(tmp, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
      chmodSync(tmp, 0o755);
      if (!publish(tmp, dir)) return this.load(manifestPath) ?? manifest;
      this.log(
        `assembled ${ref.canonical} (${contentMb} MiB of files, ${diskSizeMb} MiB disk) in ${((Date.now() - t) / 1000).toFixed(1)} s`,
      );
      return manifest;
    } catch (e) {
      if (e instanceof HutchError) throw e;
      throw new HutchError(
        'IMAGE_PULL_FAILED',
        `assembling a disk from ${ref.canonical} failed: ${tail((e as Error).message)}`,
      );
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }
}

/** Renames a finished `tmp` into place; false if another process got there first (theirs is kept). */
function publish(tmp: string, dir: string): boolean {
  try {
    renameSync(tmp, dir);
    return true;
  } catch (e) {
    if (!existsSync(dir)) throw e;
    return false;
  }
}

const tail = (text: string, lines = 15): string => text.trim().split('\n').slice(-lines).join('\n');

/** Maps skopeo's complaint to IMAGE_NOT_FOUND (the registry answered "no such thing") or IMAGE_PULL_FAILED. */
function registryError(ref: ImageRef, message: string): HutchError {
  // Phrases from Go's net and TLS errors; the message also holds skopeo's arguments, so no bare words.
  const unreachable =
    /connection refused|no such host|i\/o timeout|network is unreachable|x509: |tls: |unexpected EOF|context deadline exceeded/i;
  const notFound =
    /manifest unknown|name unknown|not found|repository name not known|requested access to the resource is denied/i;
  if (!unreachable.test(message) && notFound.test(message))
    return new HutchError('IMAGE_NOT_FOUND', `image ${ref.canonical} not found: ${tail(message, 3)}`);
  return new HutchError('IMAGE_PULL_FAILED', `pulling ${ref.canonical} failed: ${tail(message)}`);
}

interface Descriptor {
  digest?: string;
  mediaType?: string;
  annotations?: Record<string, string>;
}

/** Env, WorkingDir and architecture from the image config blob in an OCI layout (tag `image`). */
function readImageConfig(layout: string): ImageConfig & { architecture: string } {
  const blob = (digest: string | undefined): unknown => {
    if (!digest || !/^sha256:[a-f0-9]{64}$/.test(digest)) throw new Error(`bad digest in layout: ${digest}`);
    return JSON.parse(readFileSync(join(layout, 'blobs', 'sha256', digestHex(digest)), 'utf8'));
  };
  const index = JSON.parse(readFileSync(join(layout, 'index.json'), 'utf8')) as { manifests?: Descriptor[] };
  const desc =
    index.manifests?.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === 'image') ??
    index.manifests?.[0];
  const manifest = blob(desc?.digest) as { config?: Descriptor };
  const cfg = blob(manifest.config?.digest) as {
    architecture?: string;
    config?: { Env?: unknown; WorkingDir?: unknown };
  };
  const env = Array.isArray(cfg.config?.Env)
    ? cfg.config.Env.filter((e): e is string => typeof e === 'string')
    : [];
  const wd = cfg.config?.WorkingDir;
  return {
    env,
    workdir: typeof wd === 'string' && wd !== '' ? wd : null,
    architecture: cfg.architecture ?? 'unknown',
  };
}
