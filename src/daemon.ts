import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { noActions } from './api/api-caller.js';
import { type BoxesApi, startBoxesApi } from './api/boxes-server.js';
import { type GrpcApi, startGrpcApi } from './api/grpc/server.js';
import { type HttpApi, startHttpApi } from './api/http-server.js';
import { AuthService } from './auth/auth-service.js';
import { anonymousFor } from './auth/listener-policy.js';
import { inBackground } from './background.js';
import type { Config } from './config.js';
import { Engine } from './engine/engine.js';
import { GatewayActions } from './gateway/gateway-actions.js';
import { type BuildProgress, TemplateBuilder, type TemplateManifest } from './images/builder.js';
import { collectCacheGarbage } from './images/cache-gc.js';
import { registerHolder } from './images/cache-holders.js';
import { ImageStore } from './images/oci.js';
import { type Networking, startNetworking } from './net/net-service.js';
import { NetStore } from './net/net-store.js';
import { type ListeningPorts, type PortOpener, PreviewProxy } from './net/preview/preview-proxy.js';
import { repoRoot } from './paths.js';
import { openVolumes } from './storage/volumes/open-volumes.js';
import { chooseAccel } from './vmm/accel.js';

export interface Daemon {
  engine: Engine;
  net: NetStore;
  auth: AuthService;
  http: HttpApi;
  boxes: BoxesApi;
  /** The gRPC API (null when HUTCH_GRPC_PORT=off). */
  grpc: GrpcApi | null;
  close(): Promise<void>;
}

function packageVersion(): string {
  try {
    return (JSON.parse(readFileSync(join(repoRoot(), 'package.json'), 'utf8')) as { version: string })
      .version;
  } catch {
    return 'unknown';
  }
}

export type Logger = (
  level: 'info' | 'warn' | 'error',
  msg: string,
  fields?: Record<string, unknown>,
) => void;

/** What the daemon takes from outside the engine (tests and merges plug in here). */
export interface DaemonDeps {
  /** A byte stream to a TCP port inside a machine: serves the web previews. Absent: none served. */
  openPort?: PortOpener | undefined;
  /** The ports a machine listens on (GET /v1/machines/{id}/ports, proxies on port 0). */
  listeningPorts?: ListeningPorts | undefined;
}

/** TLS files named by the config, read now so a bad path fails the start with its name. */
function readTls(config: Config): { cert: Buffer; key: Buffer } | undefined {
  if (config.tlsCert === undefined || config.tlsKey === undefined) return undefined;
  const read = (what: string, path: string): Buffer => {
    try {
      return readFileSync(path);
    } catch (e) {
      throw new Error(
        `cannot read the TLS ${what} ${path} (HUTCH_TLS_${what.toUpperCase()}): ${(e as Error).message}`,
      );
    }
  };
  return { cert: read('cert', config.tlsCert), key: read('key', config.tlsKey) };
}

export function jsonLogger(minLevel: Config['logLevel']): Logger {
  const order = { debug: 0, info: 1, warn: 2, error: 3 };
  // A log reader that went away (`hutch serve | head`, a dead supervisor) makes every write fail
  // with EPIPE. Unhandled, that error is an uncaught exception the fault handlers log, which
  // fails again: the daemon spun a core forever and never finished a SIGTERM. Now the lost
  // stream is noted once and logging stops; the machines' API carries on.
  let lost = false;
  for (const s of [process.stderr, process.stdout])
    s.on('error', () => {
      lost = true;
    });
  return (level, msg, fields) => {
    if (lost || order[level] < order[minLevel]) return;
    process.stderr.write(`${JSON.stringify({ t: new Date().toISOString(), level, msg, ...fields })}\n`);
  };
}

/**
 * Starts hutch: builds (or finds cached) templates, picks the accelerator by a probe boot,
 * re-adopts machines from a previous run, then serves the API.
 */
export async function startDaemon(
  config: Config,
  opts: { log: Logger; onProgress?: (p: BuildProgress) => void; deps?: DaemonDeps },
): Promise<Daemon> {
  mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
  const auth = AuthService.open(config.stateDir, config);
  auth.ensureAdmin();
  // Checked before anything is built or booted: a refused listener should fail the start at once.
  const anonymous = anonymousFor(config.host, config, auth);
  const tls = readTls(config);
  const net = new NetStore(join(config.stateDir, 'net.db'));
  const builder = new TemplateBuilder(config.imageDir);
  if (opts.onProgress) builder.on('progress', opts.onProgress);
  // Registered before anything is built: another daemon's cache collection then keeps what this
  // one resolves to and what its machines use, from now on (src/images/cache-holders.ts).
  mkdirSync(config.imageDir, { recursive: true });
  registerHolder(config.imageDir, config.stateDir, process.pid, await builder.currentKeys());
  const templates = new Map<string, TemplateManifest>();
  for (const name of config.templates) templates.set(name, await builder.build(name));
  const first = templates.values().next().value as TemplateManifest;
  const accel = await chooseAccel({
    forced: config.accel,
    qemu: config.qemuBinary,
    kernel: first.kernel,
    cacheFile: join(config.imageDir, 'accel-probe.json'),
  });
  opts.log('info', 'accelerator chosen', { accel: accel.accel, reason: accel.reason });
  const images = new ImageStore(config.imageDir, {
    insecureRegistries: config.insecureRegistries,
    builder,
    log: (msg) => opts.log('info', msg),
  });
  // Guest networking: its failure (no nftables, not root) leaves the daemon up without it, and
  // a machine asking for a network is told why.
  let networking: Networking | undefined;
  if (config.net === 'on')
    try {
      networking = await startNetworking(config, net, opts.log);
      opts.log('info', 'guest networking ready', { dns_port: networking.dnsPort, pool: config.netPool });
    } catch (e) {
      opts.log('warn', 'guest networking unavailable; machines asking for a network are refused', {
        error: (e as Error).message,
      });
    }
  // Persistent volumes: the store is only named here (an S3 endpoint that is down now may be up
  // by the first request); its collector starts with the engine.
  const volumes = openVolumes(config, opts.log);
  // The machines API is served on the tunnels too, so it is known only once it listens below.
  let http: HttpApi | undefined;
  const engine = new Engine(config, templates, accel, opts.log, {
    images,
    // A process inside a machine acts as the machine's owner, whatever it sends: the principal
    // comes from which machine's agent opened the stream, never from the request.
    onGuestApiStream: (machineId, owner, stream) => {
      if (http) http.acceptConnection(stream, auth.guestPrincipal(owner, machineId));
      else stream.destroy();
    },
    ...(networking ? { net: networking.manager } : {}),
    volumes,
    // The model gateway needs nothing of the engine's: it is an action target beside it.
    gateway: new GatewayActions(config, opts.log),
  });
  await engine.start();
  volumes.start();
  opts.log('info', 'volumes ready', { store: volumes.store.description });
  engine.prepareSnapshots();
  // After start: the rows left are the machines and boxes that survived the restart.
  if (config.cacheGcOnStart)
    inBackground(opts.log, 'cache collection', {}, async () => {
      const r = await collectCacheGarbage({
        imageDir: config.imageDir,
        stateDir: config.stateDir,
        minAgeMs: config.cacheMinAgeSeconds * 1000,
        daemonPid: process.pid,
      });
      const freed = Object.fromEntries(
        Object.entries(r.kinds)
          .filter(([, k]) => k.removed > 0)
          .map(([kind, k]) => [kind, { count: k.removed, bytes: k.bytes }]),
      );
      opts.log('info', 'cache collected', { removed: r.freed.count, bytes: r.freed.bytes, freed });
      for (const w of r.warnings) opts.log('warn', 'cache collection', { warning: w });
    });
  const limits = { bodyIdleTimeoutMs: config.bodyIdleTimeoutMs, maxConnections: config.maxConnections };
  const nobody = noActions();
  const previews = new PreviewProxy({
    auth,
    net,
    findMachine: (p, idOrName) => engine.get(p, idOrName),
    openPort: opts.deps?.openPort ?? ((p, id, port) => engine.openPort(p, id, port)),
    listeningPorts: opts.deps?.listeningPorts ?? ((p, id) => engine.listeningPorts(p, id)),
    publicDomain: config.publicDomain,
    timeoutMs: config.previewTimeoutMs,
  });
  http = await startHttpApi(engine, {
    host: config.host,
    port: config.port,
    caller: { auth, anonymous, nobody },
    log: opts.log,
    limits,
    previews,
    tls,
  });
  const boxes = await startBoxesApi(engine, {
    socketPath: config.boxesSocket,
    listen: config.boxesListen,
    caller: { auth, nobody },
    auth: config,
    log: opts.log,
    version: packageVersion(),
    limits,
  });
  const grpc =
    config.grpcPort === null
      ? null
      : await startGrpcApi(engine, {
          host: config.grpcHost,
          port: config.grpcPort,
          authenticator: auth,
          accounts: auth,
          log: opts.log,
          maxConnections: config.maxConnections,
        });
  opts.log('info', 'listening', {
    url: http.url,
    boxes: boxes.endpoints,
    grpc: grpc?.address ?? null,
    state_dir: config.stateDir,
  });
  return {
    engine,
    net,
    auth,
    http,
    boxes,
    grpc,
    close: async () => {
      await Promise.all([http.close(), boxes.close(), grpc?.close()]);
      await volumes.stop();
      await engine.close();
      // The host's table stays while networked machines run on (a restarted daemon adopts them).
      await networking?.close({ keepHost: networking.manager.attached() > 0 });
      net.close();
      auth.close();
    },
  };
}
