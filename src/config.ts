import { readFileSync } from 'node:fs';
import { availableParallelism, totalmem } from 'node:os';
import { resolve } from 'node:path';
import { z } from 'zod';

/**
 * All configuration in one place: flags > HUTCH_* environment > JSON file (HUTCH_CONFIG or
 * --config) > defaults. This is the only module that reads process.env, so what the daemon
 * depends on is visible in one schema.
 */
const configSchema = z.object({
  host: z.string().default('127.0.0.1'),
  port: z.coerce.number().int().min(0).max(65535).default(8080),
  stateDir: z.string().default('/var/lib/hutch'),
  /** Built kernels, root filesystems and templates. Shared between daemons on one host (tests use this). */
  imageDir: z.string().optional(),
  accel: z.enum(['auto', 'kvm', 'tcg']).default('auto'),
  qemuBinary: z.string().default('qemu-system-x86_64'),
  maxMachines: z.coerce.number().int().min(1).default(16),
  /** Cap on the sum of guest memory of running machines, MiB. Default: half the host's memory. */
  maxGuestMemoryMb: z.coerce
    .number()
    .int()
    .min(64)
    .default(Math.floor(totalmem() / 1024 / 1024 / 2)),
  machineMemoryMb: z.coerce.number().int().min(64).max(65536).default(256),
  machineVcpus: z.coerce.number().int().min(1).max(8).default(1),
  /**
   * How a machine restored from a snapshot holds its RAM. `copy`: a sparse copy of the
   * snapshot's memory file of its own (what the guest touched, ~92 MiB for python), so branch
   * and suspend copy a file while the source is stopped. `map`: the snapshot's file mapped
   * copy-on-write, so idle clones share its pages (~3× less host memory each), and branch and
   * suspend stream all of RAM instead (a few times slower).
   */
  cloneMemory: z.enum(['copy', 'map']).default('copy'),
  allowPersistent: z
    .union([z.boolean(), z.enum(['1', '0', 'true', 'false'])])
    .transform((v) => v === true || v === '1' || v === 'true')
    .default(false),
  /** How long a create may wait for the guest agent before it counts as a failed boot. */
  bootTimeoutMs: z.coerce.number().int().min(1000).default(60_000),
  /** Per-stream cap on what a JSON exec keeps in memory; the rest is discarded and flagged. */
  execMaxOutputBytes: z.coerce
    .number()
    .int()
    .min(1024)
    .default(32 * 1024 * 1024),
  /**
   * Cap on the output all buffered execs (POST /exec, POST /v1/run) hold at once, until their
   * replies are written; past it output is cut and flagged, like past the per-stream cap.
   */
  execBufferBytes: z.coerce
    .number()
    .int()
    .min(1024)
    .default(64 * 1024 * 1024),
  /** Per-exec cap on the event log a box exec keeps on disk (replayed by /events); output past it is dropped. */
  execLogMaxBytes: z.coerce
    .number()
    .int()
    .min(4096)
    .default(1024 * 1024 * 1024),
  owner: z.string().default('local'),
  /**
   * Whether REST requests without a bearer token are refused on loopback listeners too. Unset:
   * loopback listeners take such requests as the local admin (`owner`), every other address
   * requires tokens. `0`/false with a non-loopback host is refused at start: an open port must
   * never act as the admin for whoever reaches it.
   */
  requireAuth: z
    .union([z.boolean(), z.enum(['1', '0', 'true', 'false'])])
    .transform((v) => v === true || v === '1' || v === 'true')
    .optional(),
  /** Lifetime of a JWT from `POST /api/v1/auth/token`, seconds. */
  tokenTtlSeconds: z.coerce
    .number()
    .int()
    .min(1)
    .max(30 * 86400)
    .default(3600),
  /** Longest lifetime a caller may ask for (gRPC CreateToken), seconds. */
  maxTokenTtlSeconds: z.coerce
    .number()
    .int()
    .min(60)
    .default(7 * 86400),
  /** API key exchanges per source address: a burst of this many, refilled at this many per minute. */
  tokenExchangesPerMinute: z.coerce.number().int().min(1).default(60),
  /** Quota of a user made without one (`hutch user add`): running machines, boxes and VMs. */
  userMaxVms: z.coerce.number().int().min(0).default(10),
  /** … and the sum of their guest memory (MiB) and vCPUs; unset: only the server's caps. */
  userMaxMemoryMb: z.coerce.number().int().min(64).optional(),
  userMaxVcpus: z.coerce.number().int().min(1).optional(),
  /** The gRPC API's port (boxd.api.v1.BoxdApi, HTTP/2 cleartext); 0: any free port; "off" disables it. */
  grpcPort: z.union([z.literal('off'), z.coerce.number().int().min(0).max(65535)]).default(9443),
  /** The gRPC API's address; default: `host`. Every call needs a bearer token, whatever the address. */
  grpcHost: z.string().optional(),
  /** Guest networking (src/net/): "on" sets up the host's part at start; "off": no machine gets a NIC. */
  net: z.enum(['on', 'off']).default('on'),
  /** The pool every networked machine's namespace link takes a /30 of. */
  netPool: z
    .string()
    .regex(/^\d{1,3}(\.\d{1,3}){3}\/(1[6-9]|2[0-8])$/, 'an IPv4 CIDR from /16 to /28')
    .default('10.213.0.0/16'),
  /** Guests are masqueraded out of this interface only; unset: any interface that is not a guest's. */
  netUplink: z.string().default(''),
  /** Upstream DNS servers of the guests' resolver ("host" or "host:port", comma-separated); unset: /etc/resolv.conf's. */
  netDns: z
    .union([z.array(z.string()), z.string()])
    .transform((v) => (Array.isArray(v) ? v : v.split(',')).map((x) => x.trim()).filter((x) => x !== ''))
    .default([]),
  /** Open connections (conntrack entries) one machine may have at once. */
  netMaxConnections: z.coerce.number().int().min(1).default(512),
  /** Bandwidth cap per machine and direction, bytes per second; 0: none. Default 100 Mbit/s. */
  netBytesPerSecond: z.coerce.number().int().min(0).default(12_500_000),
  /** Restored, warmed, paused machines kept per template for instant creates; 0 disables. */
  poolSize: z.coerce.number().int().min(0).max(64).default(2),
  /** Cap on the rate machines are written to disk (suspend, branch), MB/s; 0: as fast as possible. */
  migrationMaxMBps: z.coerce.number().int().min(0).default(0),
  /** Suspend a machine after this many idle seconds (no request touched it); 0 disables. */
  autoSuspendSeconds: z.coerce.number().int().min(0).default(0),
  /** Run QEMU under this unprivileged user when it exists (created by scripts/setup.sh). */
  qemuUser: z.string().default('hutch-vm'),
  /** Templates built at start and served (src/images/recipes.ts); "python,desktop" by default. */
  templates: z
    .union([z.array(z.string()), z.string()])
    .transform((v) => (Array.isArray(v) ? v : v.split(',')).map((x) => x.trim()).filter((x) => x !== ''))
    .default(['python', 'desktop']),
  /** The boxes API's Unix socket (owner-only). Default: <stateDir>/boxes.sock; "off" disables it. */
  boxesSocket: z.string().optional(),
  /** Also serve the boxes API on TCP, "host:port" (e.g. 127.0.0.1:8081); unset: socket only. */
  boxesListen: z.string().optional(),
  /** Per-box limits, reported by GET /v1/info. Default max_cpu: the host's cores. */
  maxBoxCpu: z.coerce.number().int().min(1).default(Math.max(1, availableParallelism())),
  maxBoxMemoryMb: z.coerce.number().int().min(64).optional(),
  maxBoxDiskGb: z.coerce.number().int().min(1).default(64),
  /** Host directories boxes may mount as volumes (colon-separated in the environment); none by default. */
  /** All exec logs of one box together, and of every box: past either, output is dropped (and flagged). */
  execLogsBoxMaxBytes: z.coerce
    .number()
    .int()
    .min(4096)
    .default(4 * 1024 ** 3),
  execLogsTotalMaxBytes: z.coerce
    .number()
    .int()
    .min(4096)
    .default(16 * 1024 ** 3),
  /**
   * How much more guest disk may be promised than the state filesystem can hold: 1 (the
   * default) promises only what is free, so no guest can fill the host's disk by filling its
   * own; 2 lets the promised total be twice that, betting that guests don't fill their disks.
   */
  diskOvercommit: z.coerce.number().min(0.01).max(1000).default(1),
  /** Largest attachable disk (CreateDisk, POST /v1/disks), bytes. Sparse: what a guest may fill. */
  diskMaxBytes: z.coerce
    .number()
    .int()
    .min(64 * 2 ** 20)
    .default(2 ** 40),
  /** Sum of one user's attachable disks' sizes, bytes. */
  diskQuotaBytes: z.coerce
    .number()
    .int()
    .min(64 * 2 ** 20)
    .default(4 * 2 ** 40),
  volumeRoots: z
    .union([z.array(z.string()), z.string()])
    .transform((v) => (Array.isArray(v) ? v : v.split(':')).filter((x) => x !== '').map((x) => resolve(x)))
    .default([]),
  /** Registries pulled over plain HTTP / without TLS verification (host or host:port). */
  insecureRegistries: z
    .union([z.array(z.string()), z.string()])
    .transform((v) => (Array.isArray(v) ? v : v.split(',')).map((x) => x.trim()).filter((x) => x !== ''))
    .default(['localhost', '127.0.0.1']),
  /** Collect unused templates, images and snapshots from the image cache at start (src/images/cache-gc.ts). */
  cacheGcOnStart: z
    .union([z.boolean(), z.enum(['1', '0', 'true', 'false'])])
    .transform((v) => v === true || v === '1' || v === 'true')
    .default(true),
  /** The collector keeps anything built or used within this many seconds. */
  cacheMinAgeSeconds: z.coerce
    .number()
    .int()
    .min(0)
    .default(24 * 3600),
  logLevel: z.enum(['debug', 'info', 'warn', 'error']).default('info'),
  /** A request body (or its headers) sending nothing for this long is cut off with 408, on every API. */
  bodyIdleTimeoutMs: z.coerce.number().int().min(100).default(30_000),
  /** Connections each API server keeps open at once; more are closed when accepted. */
  maxConnections: z.coerce.number().int().min(1).default(1024),
  /**
   * Serve the machines API's TCP listener over TLS with this certificate and key (PEM file
   * paths); both or neither.
   */
  tlsCert: z.string().optional(),
  tlsKey: z.string().optional(),
  /**
   * Route previews by Host: `{port}-{machine id}.{domain}`, `{proxy name}.{domain}` and bound
   * domains (docs/previews.md). Unset: previews are served on their /v1/machines/{id}/web/ paths only.
   */
  publicDomain: z
    .string()
    .transform((v) =>
      v
        .trim()
        .toLowerCase()
        .replace(/^\.+|\.+$/g, ''),
    )
    .refine((v) => /^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/.test(v), {
      message: 'not a domain name',
    })
    .optional(),
  /** The model the agents (docs/agents.md) use when a client names none. */
  agentModel: z.string().min(1).default('claude-sonnet-4-5'),
  /** The computer-use tool version the computer agent offers when a client names none. */
  agentToolVersion: z.enum(['computer_20250124', 'computer_20251124']).default('computer_20250124'),
  /** The most steps (model turns) one agent run may take: `max_steps` is 1..this. */
  agentMaxSteps: z.coerce.number().int().min(1).max(1000).default(200),
  /** How long one agent run may take, model calls included. */
  agentTimeLimitMs: z.coerce
    .number()
    .int()
    .min(1000)
    .default(30 * 60_000),
  /** Pause between the computer agent's input and the screenshot that shows its effect. */
  agentSettleMs: z.coerce.number().int().min(0).max(10_000).default(500),
  /** How long a preview waits for the guest's server to send its response headers. */
  previewTimeoutMs: z.coerce.number().int().min(100).default(60_000),
  /** Where persistent volumes (docs/volumes.md) are kept: a local directory or an S3 bucket. */
  volumeBackend: z.enum(['local', 's3']).default('local'),
  /** The local backend's directory; default <stateDir>/volumes. */
  volumeDir: z.string().optional(),
  /** Largest sum of file sizes one volume may hold, bytes (20 GiB). */
  volumeMaxBytes: z.coerce
    .number()
    .int()
    .min(1)
    .default(20 * 1024 ** 3),
  /** Most entries (files, directories, symlinks) one volume may hold. */
  volumeMaxFiles: z.coerce.number().int().min(1).default(200_000),
  /** Most volumes one user may have at once. */
  volumeMaxPerUser: z.coerce.number().int().min(1).default(100),
  /** How often expired volumes and unreferenced segments are collected. */
  volumeGcIntervalMs: z.coerce.number().int().min(1000).default(60_000),
  /** Objects no version references are removed only once this old (a save or a read may be under way elsewhere). */
  volumeGcGraceMs: z.coerce.number().int().min(1000).default(3_600_000),
  /** The S3 backend: endpoint URL (unset: AWS), bucket, region, credentials (unset: the SDK's usual sources). */
  s3Endpoint: z.string().optional(),
  s3Bucket: z.string().optional(),
  s3Region: z.string().default('us-east-1'),
  s3AccessKeyId: z.string().optional(),
  s3SecretAccessKey: z.string().optional(),
  /** Path-style URLs (endpoint/bucket/key), what most S3-compatible servers want. */
  s3ForcePathStyle: z
    .union([z.boolean(), z.enum(['1', '0', 'true', 'false'])])
    .transform((v) => v === true || v === '1' || v === 'true')
    .default(true),
  /** Prepended to every key ("team-a/" → team-a/volumes/<id>/…). */
  s3Prefix: z
    .string()
    .transform((v) => v.replace(/^\/+/, ''))
    .transform((v) => (v === '' || v.endsWith('/') ? v : `${v}/`))
    .default(''),
  /** Attempts per S3 request (the SDK retries 5xx, throttling and resets with backoff). */
  s3MaxAttempts: z.coerce.number().int().min(1).max(20).default(5),
  /** Multipart upload part size, bytes (S3's minimum: 5 MiB). */
  s3PartBytes: z.coerce
    .number()
    .int()
    .min(5 * 1024 * 1024)
    .max(5 * 1024 ** 3)
    .default(8 * 1024 * 1024),
  /** An S3 request without an answer for this long fails (and is retried). */
  s3TimeoutMs: z.coerce.number().int().min(100).default(30_000),
  /** The model gateway (docs/gateway.md): Anthropic's key; unset: no claude* model is served. */
  anthropicKey: z.string().optional(),
  anthropicBaseUrl: z
    .string()
    .url()
    .transform((v) => v.replace(/\/+$/, ''))
    .default('https://api.anthropic.com'),
  /** Claude models listed when Anthropic's GET /v1/models cannot be reached (comma-separated). */
  anthropicModels: z
    .union([z.array(z.string()), z.string()])
    .transform((v) => (Array.isArray(v) ? v : v.split(',')).map((x) => x.trim()).filter((x) => x !== ''))
    .default([]),
  /** OpenRouter's key (every model that is not claude*); unset: those are not served. */
  openrouterKey: z.string().optional(),
  openrouterBaseUrl: z
    .string()
    .url()
    .transform((v) => v.replace(/\/+$/, ''))
    .default('https://openrouter.ai/api/v1'),
  /** A model provider sending nothing for this long (before its first byte, or between two) fails the request with 504. */
  gatewayTimeoutMs: z.coerce.number().int().min(100).default(120_000),
});

export type Config = Omit<
  z.infer<typeof configSchema>,
  'boxesSocket' | 'maxBoxMemoryMb' | 'grpcPort' | 'grpcHost' | 'volumeDir'
> & {
  volumeDir: string;
  /** null when the gRPC API is off. */
  grpcPort: number | null;
  grpcHost: string;
  imageDir: string;
  /** Absolute path, or null when the socket is disabled. */
  boxesSocket: string | null;
  maxBoxMemoryMb: number;
};
export type ConfigInput = z.input<typeof configSchema>;

const envNames: Record<string, keyof ConfigInput> = {
  HUTCH_HOST: 'host',
  HUTCH_PORT: 'port',
  HUTCH_STATE_DIR: 'stateDir',
  HUTCH_IMAGE_DIR: 'imageDir',
  HUTCH_ACCEL: 'accel',
  HUTCH_QEMU: 'qemuBinary',
  HUTCH_MAX_MACHINES: 'maxMachines',
  HUTCH_MAX_GUEST_MEMORY_MB: 'maxGuestMemoryMb',
  HUTCH_MACHINE_MEMORY_MB: 'machineMemoryMb',
  HUTCH_MACHINE_VCPUS: 'machineVcpus',
  HUTCH_CLONE_MEMORY: 'cloneMemory',
  HUTCH_ALLOW_PERSISTENT: 'allowPersistent',
  HUTCH_BOOT_TIMEOUT_MS: 'bootTimeoutMs',
  HUTCH_EXEC_MAX_OUTPUT_BYTES: 'execMaxOutputBytes',
  HUTCH_EXEC_BUFFER_BYTES: 'execBufferBytes',
  HUTCH_EXEC_LOG_MAX_BYTES: 'execLogMaxBytes',
  HUTCH_QEMU_USER: 'qemuUser',
  HUTCH_LOG_LEVEL: 'logLevel',
  HUTCH_CACHE_GC_ON_START: 'cacheGcOnStart',
  HUTCH_CACHE_MIN_AGE_SECONDS: 'cacheMinAgeSeconds',
  HUTCH_AUTO_SUSPEND_SECONDS: 'autoSuspendSeconds',
  HUTCH_MIGRATION_MAX_MBPS: 'migrationMaxMBps',
  HUTCH_POOL_SIZE: 'poolSize',
  HUTCH_GRPC_PORT: 'grpcPort',
  HUTCH_GRPC_HOST: 'grpcHost',
  HUTCH_NET: 'net',
  HUTCH_NET_POOL: 'netPool',
  HUTCH_NET_UPLINK: 'netUplink',
  HUTCH_NET_DNS: 'netDns',
  HUTCH_NET_MAX_CONNECTIONS: 'netMaxConnections',
  HUTCH_NET_BYTES_PER_SECOND: 'netBytesPerSecond',
  HUTCH_BOXES_SOCKET: 'boxesSocket',
  HUTCH_BOXES_LISTEN: 'boxesListen',
  HUTCH_MAX_BOX_CPU: 'maxBoxCpu',
  HUTCH_MAX_BOX_MEMORY_MB: 'maxBoxMemoryMb',
  HUTCH_MAX_BOX_DISK_GB: 'maxBoxDiskGb',
  HUTCH_VOLUME_ROOTS: 'volumeRoots',
  HUTCH_TEMPLATES: 'templates',
  HUTCH_REQUIRE_AUTH: 'requireAuth',
  HUTCH_TOKEN_TTL_SECONDS: 'tokenTtlSeconds',
  HUTCH_MAX_TOKEN_TTL_SECONDS: 'maxTokenTtlSeconds',
  HUTCH_TOKEN_EXCHANGES_PER_MINUTE: 'tokenExchangesPerMinute',
  HUTCH_USER_MAX_VMS: 'userMaxVms',
  HUTCH_USER_MAX_MEMORY_MB: 'userMaxMemoryMb',
  HUTCH_USER_MAX_VCPUS: 'userMaxVcpus',
  HUTCH_INSECURE_REGISTRIES: 'insecureRegistries',
  HUTCH_EXEC_LOGS_BOX_MAX_BYTES: 'execLogsBoxMaxBytes',
  HUTCH_EXEC_LOGS_TOTAL_MAX_BYTES: 'execLogsTotalMaxBytes',
  HUTCH_DISK_OVERCOMMIT: 'diskOvercommit',
  HUTCH_DISK_MAX_BYTES: 'diskMaxBytes',
  HUTCH_DISK_QUOTA_BYTES: 'diskQuotaBytes',
  HUTCH_BODY_IDLE_TIMEOUT_MS: 'bodyIdleTimeoutMs',
  HUTCH_MAX_CONNECTIONS: 'maxConnections',
  HUTCH_TLS_CERT: 'tlsCert',
  HUTCH_TLS_KEY: 'tlsKey',
  HUTCH_PUBLIC_DOMAIN: 'publicDomain',
  HUTCH_PREVIEW_TIMEOUT_MS: 'previewTimeoutMs',
  HUTCH_AGENT_MODEL: 'agentModel',
  HUTCH_AGENT_TOOL_VERSION: 'agentToolVersion',
  HUTCH_AGENT_MAX_STEPS: 'agentMaxSteps',
  HUTCH_AGENT_TIME_LIMIT_MS: 'agentTimeLimitMs',
  HUTCH_AGENT_SETTLE_MS: 'agentSettleMs',
  HUTCH_VOLUME_BACKEND: 'volumeBackend',
  HUTCH_VOLUME_DIR: 'volumeDir',
  HUTCH_VOLUME_MAX_BYTES: 'volumeMaxBytes',
  HUTCH_VOLUME_MAX_FILES: 'volumeMaxFiles',
  HUTCH_VOLUME_MAX_PER_USER: 'volumeMaxPerUser',
  HUTCH_VOLUME_GC_INTERVAL_MS: 'volumeGcIntervalMs',
  HUTCH_VOLUME_GC_GRACE_MS: 'volumeGcGraceMs',
  HUTCH_S3_ENDPOINT: 's3Endpoint',
  HUTCH_S3_BUCKET: 's3Bucket',
  HUTCH_S3_REGION: 's3Region',
  HUTCH_S3_ACCESS_KEY_ID: 's3AccessKeyId',
  HUTCH_S3_SECRET_ACCESS_KEY: 's3SecretAccessKey',
  HUTCH_S3_FORCE_PATH_STYLE: 's3ForcePathStyle',
  HUTCH_S3_PREFIX: 's3Prefix',
  HUTCH_S3_MAX_ATTEMPTS: 's3MaxAttempts',
  HUTCH_S3_PART_BYTES: 's3PartBytes',
  HUTCH_S3_TIMEOUT_MS: 's3TimeoutMs',
  HUTCH_ANTHROPIC_KEY: 'anthropicKey',
  HUTCH_ANTHROPIC_BASE_URL: 'anthropicBaseUrl',
  HUTCH_ANTHROPIC_MODELS: 'anthropicModels',
  HUTCH_OPENROUTER_KEY: 'openrouterKey',
  HUTCH_OPENROUTER_BASE_URL: 'openrouterBaseUrl',
  HUTCH_GATEWAY_TIMEOUT_MS: 'gatewayTimeoutMs',
};

export function loadConfig(
  flags: Partial<ConfigInput> = {},
  env: NodeJS.ProcessEnv = process.env,
  configFileFlag?: string,
): Config {
  const configFile = configFileFlag ?? env.HUTCH_CONFIG;
  let fromFile: Record<string, unknown> = {};
  if (configFile) {
    try {
      fromFile = JSON.parse(readFileSync(configFile, 'utf8')) as Record<string, unknown>;
    } catch (e) {
      throw new Error(`cannot read config file ${configFile}: ${(e as Error).message}`);
    }
  }
  const fromEnv: Record<string, unknown> = {};
  for (const [name, key] of Object.entries(envNames)) {
    const v = env[name];
    if (v !== undefined && v !== '') fromEnv[key] = v;
  }
  // The key other tools on these hosts already use, when hutch's own is not set.
  if (fromEnv.openrouterKey === undefined && env.BORING_OPENROUTER_KEY)
    fromEnv.openrouterKey = env.BORING_OPENROUTER_KEY;
  const defined = Object.fromEntries(Object.entries(flags).filter(([, v]) => v !== undefined));
  const parsed = configSchema.safeParse({ ...fromFile, ...fromEnv, ...defined });
  if (!parsed.success) {
    const issues = parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ');
    throw new Error(`invalid configuration: ${issues}`);
  }
  const c = parsed.data;
  // Half a TLS configuration would silently serve plain HTTP: refuse it.
  if ((c.tlsCert === undefined) !== (c.tlsKey === undefined))
    throw new Error(
      'invalid configuration: HUTCH_TLS_CERT and HUTCH_TLS_KEY (tlsCert, tlsKey) must be given together',
    );
  if (c.volumeBackend === 's3' && !c.s3Bucket)
    throw new Error('invalid configuration: HUTCH_VOLUME_BACKEND=s3 needs HUTCH_S3_BUCKET (s3Bucket)');
  const stateDir = resolve(c.stateDir);
  return {
    ...c,
    stateDir,
    imageDir: resolve(c.imageDir ?? `${c.stateDir}/images`),
    boxesSocket: c.boxesSocket === 'off' ? null : resolve(c.boxesSocket ?? `${stateDir}/boxes.sock`),
    grpcPort: c.grpcPort === 'off' ? null : c.grpcPort,
    grpcHost: c.grpcHost ?? c.host,
    volumeDir: resolve(c.volumeDir ?? `${stateDir}/volumes`),
    // One box may have at most what the guest memory cap leaves for everything.
    maxBoxMemoryMb: c.maxBoxMemoryMb ?? Math.min(c.maxGuestMemoryMb, 16384),
  };
}

/** Where the CLI finds the daemon: --url > HUTCH_URL > the default listen address. */
export function clientUrl(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  return flag ?? env.HUTCH_URL ?? 'http://127.0.0.1:8080';
}

/**
 * Where `hutch box` finds the boxes API: --socket > --url > HUTCH_BOXES_SOCKET >
 * HUTCH_BOXES_URL > the daemon's default socket, <HUTCH_STATE_DIR or /var/lib/hutch>/boxes.sock.
 */
export function clientBoxesEndpoint(
  flags: { socket?: string | undefined; url?: string | undefined },
  env: NodeJS.ProcessEnv = process.env,
): { socketPath: string } | { url: string } {
  if (flags.socket) return { socketPath: resolve(flags.socket) };
  if (flags.url) return { url: flags.url };
  if (env.HUTCH_BOXES_SOCKET && env.HUTCH_BOXES_SOCKET !== 'off')
    return { socketPath: resolve(env.HUTCH_BOXES_SOCKET) };
  if (env.HUTCH_BOXES_URL) return { url: env.HUTCH_BOXES_URL };
  return { socketPath: resolve(env.HUTCH_STATE_DIR || '/var/lib/hutch', 'boxes.sock') };
}

/** What the CLI authenticates with (src/client/credentials.ts): the environment's part. */
export interface ClientCredentialsEnv {
  /** `$HUTCH_TOKEN`: a JWT sent as is. */
  token?: string | undefined;
  /** `$HUTCH_API_KEY`: exchanged for a JWT per run. */
  apiKey?: string | undefined;
  /** `$HUTCH_CREDENTIALS`, else `$XDG_CONFIG_HOME/hutch/credentials.json` (~/.config/…). */
  file: string;
}

export function clientCredentialsEnv(env: NodeJS.ProcessEnv = process.env): ClientCredentialsEnv {
  const home = env.HOME || '/root';
  return {
    token: env.HUTCH_TOKEN || undefined,
    apiKey: env.HUTCH_API_KEY || undefined,
    file:
      env.HUTCH_CREDENTIALS ||
      resolve(env.XDG_CONFIG_HOME || resolve(home, '.config'), 'hutch', 'credentials.json'),
  };
}
