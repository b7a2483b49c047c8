import { z } from 'zod';
import { MAX_PAYLOAD } from '../guest/protocol.js';
import { execPayloadBound } from '../guest/protocol-messages.js';

/**
 * Request and response schemas of the machines API. The same objects validate requests, give the
 * handlers their types, and generate the OpenAPI document served at /openapi.json (and checked
 * in as spec/openapi.json), so the document cannot drift from what the server accepts.
 */
/** Egress rules: IPv4 addresses/CIDRs and domain names (`pypi.org`, `*.pypi.org`). */
export const egressBody = z
  .object({
    allow: z
      .array(z.string().max(260))
      .max(1000)
      .optional()
      .describe(
        'Only these destinations (plus what the allowed names resolve to) are reachable; empty or absent: the public internet.',
      ),
    deny: z.array(z.string().max(260)).max(1000).optional().describe('Never these, whatever `allow` says.'),
  })
  .strict();

export const egressSchema = z.object({
  id: z.string(),
  net: z.boolean().describe('false: the machine has no network (no rules apply)'),
  rules: z.object({ allow: z.array(z.string()), deny: z.array(z.string()) }),
  denied: z
    .record(z.string(), z.number().int())
    .describe('Refusals since the machine started, per reason: always, rule, not-allowed, limit, dns.'),
  recent: z
    .array(
      z.object({
        reason: z.string(),
        destination: z.string().describe('An address, or the refused name (reason dns)'),
        protocol: z.string().optional(),
        port: z.number().int().optional(),
        name: z.string().optional(),
        detail: z
          .string()
          .optional()
          .describe('reason dns: not-allowed, denied, private-answer, rate-limited'),
        count: z.number().int(),
        last_seen: z.string(),
      }),
    )
    .describe('The latest refused destinations, newest first (at most 100).'),
});

export const createMachineBody = z
  .object({
    template: z
      .string()
      .min(1)
      .max(64)
      .default('python')
      .describe(
        'Template to boot: "python" (headless shell) or "desktop" (a screen: VNC, screenshots, input).',
      ),
    ttl_seconds: z
      .number()
      .int()
      .optional()
      .describe('Seconds until the machine destroys itself; clamped to 15–900, default 60.'),
    persistent: z
      .boolean()
      .optional()
      .describe('Keep running until deleted. Honoured only when the server allows it; else the TTL applies.'),
    name: z
      .string()
      .regex(/^[a-z0-9][a-z0-9-]{0,62}$/, 'lower-case letters, digits and dashes, at most 63')
      .optional()
      .describe('Optional unique name; the machine can be addressed by it.'),
    net: z
      .boolean()
      .optional()
      .describe(
        'Give the machine a NIC: NAT to the internet behind its own firewall (default false; desktops: true when the server has networking).',
      ),
    screen: z
      .object({ width: z.number().int(), height: z.number().int() })
      .strict()
      .optional()
      .describe(
        "A desktop machine's screen in pixels (even numbers, 320-2560 by 240-1600; default 1024x768). Common sizes restore from a snapshot of their own; others boot cold (~30 s under TCG).",
      ),
    egress: egressBody
      .optional()
      .describe('Egress rules of a networked machine (see PUT /v1/machines/{id}/egress).'),
    network_id: z
      .string()
      .max(64)
      .optional()
      .describe('One of your networks (id or name; gRPC CreateNetwork); default: your default network.'),
    auto_suspend_seconds: z
      .number()
      .int()
      .min(0)
      .max(86_400)
      .optional()
      .describe("Suspend the machine after this many idle seconds (0: never; default: the server's)."),
    mode: z
      .enum(['snapshot', 'cold'])
      .optional()
      .describe('snapshot: restore from the template snapshot (the default once it exists); cold: boot.'),
    volume: z
      .string()
      .max(64)
      .optional()
      .describe(
        'A volume of yours (vol-…): its files are restored into /root before the create answers; if that fails the machine is destroyed and the error returned.',
      ),
  })
  .strict();

/** A string the guest can take as a C string (argv, environment, paths): no NUL. */
export const cString = (): z.ZodString => z.string().refine((v) => !v.includes('\0'), 'must not contain NUL');

/**
 * Checks that a command fits the one agent request that carries it (argv, environment and
 * working directory in one frame of at most 64 KiB), reporting the sizes rather than letting the
 * request fail on its way to the guest.
 */
export function checkExecFits(
  ctx: z.RefinementCtx,
  req: { argv: readonly string[]; env?: Record<string, string> | null | undefined; cwd?: string | undefined },
  limit = MAX_PAYLOAD,
  what = 'the command, its environment and working directory',
): void {
  const n = execPayloadBound({
    argv: req.argv,
    ...(req.env ? { env: req.env } : {}),
    ...(req.cwd !== undefined ? { cwd: req.cwd } : {}),
  });
  if (n > limit)
    ctx.addIssue({
      code: 'custom',
      path: [],
      message: `${what} take ${n} bytes encoded, over the limit of ${limit} bytes (the guest agent protocol carries a command in one frame of at most 64 KiB)`,
    });
}

export const execBody = z
  .object({
    cmd: z
      .union([z.array(cString()).min(1), cString().min(1)])
      .describe('argv (no shell), or a string run with /bin/sh -c.'),
    env: z.record(z.string().regex(/^[^=\0]+$/), cString()).optional(),
    cwd: cString().startsWith('/').optional().describe('Working directory, default /root.'),
    stdin: z.string().optional().describe("Text written to the command's standard input (then closed)."),
    timeout_ms: z
      .number()
      .int()
      .min(1)
      .max(3_600_000)
      .optional()
      .describe('Kill the command after this long; default 60000.'),
  })
  .strict()
  .superRefine((b, ctx) =>
    checkExecFits(ctx, {
      argv: typeof b.cmd === 'string' ? ['/bin/sh', '-c', b.cmd] : b.cmd,
      env: b.env,
      cwd: b.cwd,
    }),
  );

export const jailSchema = z
  .object({ seccomp: z.boolean(), user: z.string().nullable(), cgroup: z.string().nullable() })
  .nullable();

export const machineSchema = z.object({
  id: z.string().describe('m- followed by 8 hex digits'),
  name: z.string().nullable(),
  owner: z.string(),
  template: z.string(),
  status: z.enum([
    'starting',
    'running',
    'paused',
    'suspending',
    'suspended',
    'resuming',
    'failed',
    'destroying',
  ]),
  mode: z
    .enum(['cold', 'snapshot', 'branch', 'pool'])
    .describe(
      'How it started: cold boot, restored from the template snapshot, branched, or taken from the warm pool.',
    ),
  forked_from: z.string().nullable().describe('The machine this one was branched from.'),
  boot_ms: z.number().int().nullable().describe('Request received → agent answered, for this machine.'),
  accel: z.string().describe('kvm or tcg'),
  vcpus: z.number().int(),
  memory_mb: z.number().int(),
  persistent: z.boolean(),
  ttl_seconds: z.number().int().nullable(),
  created_at: z.string(),
  expires_at: z.string().nullable(),
  error: z.string().nullable(),
  jail: jailSchema,
  auto_suspend_seconds: z.number().int(),
  net: z.boolean().describe('The machine has a network (NAT behind its firewall).'),
  screen: z
    .object({ width: z.number().int(), height: z.number().int() })
    .nullable()
    .describe('Its screen (desktop machines: VNC, screenshots, input); null: headless.'),
  address: z
    .string()
    .nullable()
    .describe(
      "Where the machines of the owner's network reach this one while it runs; null without a network.",
    ),
});

export const lifecycleResultSchema = machineSchema.extend({
  pause_us: z.number().int().optional().describe('QEMU time to stop the vCPUs, µs.'),
  resume_us: z
    .number()
    .int()
    .optional()
    .describe('Time until the vCPUs run again (from disk: until restored), µs.'),
  suspend_us: z.number().int().optional().describe('Time to write the machine to disk and free it, µs.'),
});

export const branchBody = z
  .object({
    name: createMachineBody.shape.name,
    ttl_seconds: createMachineBody.shape.ttl_seconds,
  })
  .strict();

export const branchResultSchema = machineSchema.extend({
  pause_ms: z.number().describe('How long the source was stopped for the fork.'),
});

export const autoSuspendBody = z
  .object({
    seconds: z.number().int().min(0).max(86_400).describe('Idle seconds before auto-suspend; 0 disables.'),
  })
  .strict();

export const machineListSchema = z.object({ machines: z.array(machineSchema) });

export const execResultSchema = z.object({
  exit_code: z.number().int().nullable(),
  signal: z.number().int().nullable(),
  timed_out: z.boolean(),
  stdout: z.string(),
  stderr: z.string(),
  truncated: z.boolean().describe("Output past the server's per-stream cap was dropped."),
  duration_ms: z.number().int(),
});

export const errorSchema = z.object({ code: z.string(), message: z.string() });

/** Guest disk against the host's state filesystem (thin disks are promised, not yet used). */
export const diskRoomSchema = z
  .object({
    free_bytes: z.number().describe('Free bytes on the state filesystem.'),
    promised_bytes: z
      .number()
      .describe("Bytes guests' disks may still grow by (each disk's size less what it holds)."),
    overcommit: z
      .number()
      .describe(
        'How many times the free space may be promised (HUTCH_DISK_OVERCOMMIT; 1: never more than is free).',
      ),
  })
  .describe('A disk is only created when its size fits: promised + new ≤ free × overcommit.');

export const healthSchema = z.object({
  status: z.literal('ok'),
  running: z.number().int(),
  machines: z.number().int(),
  accel: z.string(),
  accel_reason: z.string(),
  templates: z.record(z.string(), z.enum(['ready', 'not built'])),
  snapshots: z.record(z.string(), z.enum(['ready', 'building', 'failed', 'none'])),
  pool: z.record(z.string(), z.object({ ready: z.number().int(), target: z.number().int() })),
  guest_memory_mb: z.object({ used: z.number().int(), cap: z.number().int() }),
  max_machines: z.number().int(),
  uptime_s: z.number().int(),
  disk: diskRoomSchema,
});

export const attachQuery = z.object({
  shell: cString()
    .startsWith('/')
    .max(4096)
    .default('/bin/bash')
    .describe('Absolute path of the shell to run.'),
  cols: z.coerce.number().int().min(1).max(1000).default(80).describe('Terminal columns.'),
  rows: z.coerce.number().int().min(1).max(1000).default(24).describe('Terminal rows.'),
  term: z
    .string()
    .regex(/^[A-Za-z0-9._+-]{1,64}$/)
    .default('xterm-256color')
    .describe('TERM for the shell.'),
});

export const uploadResultSchema = z.object({
  path: z.string().describe('Where the file was written: /root/<X-Filename>.'),
  size: z.number().int().describe('Bytes written.'),
});

export const downloadQuery = z.object({
  path: cString()
    .startsWith('/', 'an absolute path in the machine is required (?path=/…)')
    .describe('Absolute path in the machine.'),
});

export const tokenBody = z.object({
  api_key: z.string().max(256).describe('An API key: "bxd_" and 40 letters and digits'),
});

export const tokenSchema = z.object({
  token: z.string().describe('A JWT: send it as "authorization: Bearer <token>"'),
  expires_at: z.number().int().describe('Unix seconds'),
  user_id: z.string(),
});

export const whoamiSchema = z.object({
  user_id: z.string(),
  via: z.enum(['local', 'socket', 'token', 'guest']),
  machine: z.string().optional().describe('For requests from inside a machine: which one'),
});

export const tokenInfoSchema = z.object({
  jti: z.string(),
  created_at: z.number().int(),
  expires_at: z.number().int(),
});

export const createTokenBody = z.object({
  expires_in_secs: z
    .number()
    .int()
    .min(0)
    .default(0)
    .describe('0: the server default (HUTCH_TOKEN_TTL_SECONDS)'),
});

export const apiKeyInfoSchema = z.object({
  id: z.string(),
  name: z.string(),
  key_prefix: z.string(),
  created_at: z.number().int(),
  last_used_at: z.number().int().describe('0: never'),
  expires_at: z.number().int().describe('0: never'),
});

export const createApiKeyBody = z.object({
  name: z.string().max(128).default(''),
  expires_in_secs: z.number().int().min(0).default(0).describe('0: never expires'),
});

export const createdApiKeySchema = z.object({
  id: z.string(),
  api_key: z.string().describe('The key: shown this once, stored only as a hash'),
  expires_at: z.number().int(),
});
