import { z } from 'zod';
import { MAX_PAYLOAD } from '../guest/protocol.js';
import { attachQuery, checkExecFits, cString, diskRoomSchema, egressBody } from './schemas.js';

/**
 * Schemas of the boxes API (../shared/specs/boxes-rest-api.txt), field names and defaults as the
 * spec has them. They validate requests and generate spec/boxes-openapi.json.
 */
const absPath = z
  .string()
  .min(1)
  .max(4096)
  .startsWith('/', 'must be an absolute path')
  .refine((p) => !p.includes('\0'), 'must not contain NUL')
  .refine((p) => !p.split('/').includes('..'), 'must not contain ".."');

const envSchema = z.record(
  z
    .string()
    .min(1)
    .regex(/^[^=\0]+$/, 'an environment name has no "=" or NUL'),
  z.string().refine((v) => !v.includes('\0'), 'must not contain NUL'),
);

export const volumeSchema = z
  .object({
    host_path: absPath.describe('Directory on the host (inside an allowed root: GET /v1/info volume_roots).'),
    guest_path: absPath.describe('Where it appears in the box.'),
    readonly: z.boolean().default(false).describe('Enforced by the host: the box cannot write to it.'),
  })
  .strict();

const imageRef = z
  .string()
  .min(1)
  .max(512)
  .regex(/^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$/, 'an OCI image reference, e.g. debian:bookworm')
  .describe('OCI image: a registry reference (Docker Hub by default) or a locally buildable debian:*.');

const sizes = {
  cpu: z.number().int().min(1).default(2).describe('vCPUs.'),
  memory_mb: z.number().int().min(128).default(1024).describe('Guest memory, MiB.'),
  network: z
    .boolean()
    .default(false)
    .describe("A NIC: NAT to the internet behind the box's own firewall (docs/networking.md)."),
  egress: egressBody.optional().describe('Egress rules of a networked box (allow/deny CIDRs and domains).'),
  network_id: z
    .string()
    .max(64)
    .optional()
    .describe('One of your networks (id or name); default: your default network.'),
  env: envSchema.nullable().default(null).describe('Environment for every exec in the box.'),
  volumes: z.array(volumeSchema).max(4).nullable().default(null).describe('At most 4 host directories.'),
};

export const createBoxBody = z
  .object({
    image: imageRef,
    name: z
      .string()
      .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'letters, digits, ".", "_" and "-", at most 63')
      .optional()
      .describe('Unique name; the box can be addressed by it.'),
    ...sizes,
    disk_size_gb: z.number().int().min(1).default(8).describe('Size of the box disk, GiB.'),
    workdir: absPath
      .optional()
      .describe("Working directory of every exec; default: the image's WorkingDir, else /root."),
  })
  .strict()
  // Every exec carries these in its agent request: half of it is left for the commands.
  .superRefine((b, ctx) =>
    checkExecFits(ctx, { argv: [], env: b.env, cwd: b.workdir }, MAX_PAYLOAD / 2, 'env and workdir'),
  );

export const boxSchema = z.object({
  id: z.string(),
  name: z.string().nullable(),
  status: z.string(),
  image: z.string(),
  cpu: z.number(),
  memory_mb: z.number(),
  disk_size_gb: z.number(),
  network: z.boolean(),
  address: z
    .string()
    .nullable()
    .describe(
      "Where the machines of the owner's network reach this box while it runs; null without a network.",
    ),
  workdir: z.string(),
  env: z.record(z.string(), z.string()).nullable(),
  volumes: z.array(volumeSchema).nullable(),
  created_at: z.string(),
  started_at: z.string().nullable(),
  stopped_at: z.string().nullable(),
  error: z.string().nullable(),
  digest: z.string(),
  accel: z.string(),
  mode: z.enum(['cold', 'snapshot']).describe("snapshot: restored from the image's snapshot; cold: booted."),
  boot_ms: z.number().nullable(),
  // Set through the engine's other adapters (gRPC VMs); boxes made here have the defaults.
  auto_suspend_seconds: z
    .number()
    .optional()
    .describe('Idle seconds before it is suspended to disk (0: never).'),
  auto_destroy_seconds: z.number().optional().describe('Seconds from create until it is removed (0: never).'),
  expires_at: z.string().nullable().optional().describe('When auto-destroy removes it.'),
  restart_policy: z.enum(['no', 'always', 'on-failure']).optional().describe('What happens when cmd exits.'),
  cmd: z.array(z.string()).nullable().optional().describe('Started in the background after every boot.'),
  forked_from: z.string().nullable().optional().describe('The box this one was forked from.'),
  template: z.string().nullable().optional().describe('The user template it was created from.'),
});

export const boxListSchema = z.object({ boxes: z.array(boxSchema) });

export const boxExecBody = z
  .object({
    cmd: z.array(cString()).min(1).describe('argv (no shell: use ["sh","-c","…"] for one).'),
    env: envSchema.optional(),
    workdir: absPath.optional().describe("Default: the box's workdir."),
    timeout_ms: z
      .number()
      .int()
      .min(1)
      .max(86_400_000)
      .nullable()
      .optional()
      .describe('Kill the command after this long (status timed_out).'),
  })
  .strict()
  .superRefine((b, ctx) => checkExecFits(ctx, { argv: b.cmd, env: b.env, cwd: b.workdir }));

export const execSchema = z.object({
  id: z.string(),
  box_id: z.string(),
  status: z.enum(['running', 'completed', 'failed', 'timed_out', 'cancelled']),
  cmd: z.array(z.string()),
  exit_code: z.number().nullable(),
  signal: z.number().nullable(),
  error: z.string().nullable(),
  created_at: z.string(),
  finished_at: z.string().nullable(),
});

export const execListSchema = z.object({ execs: z.array(execSchema) });

export const downloadBody = z.object({ path: absPath }).strict();

export const uploadResultSchema = z.object({ ok: z.literal(true), dest: z.string(), size: z.number() });

export const infoSchema = z.object({
  max_cpu: z.number(),
  max_memory_mb: z.number(),
  max_disk_size_gb: z.number(),
  max_boxes: z.number(),
  volume_roots: z.array(z.string()),
  accel: z.string(),
  version: z.string(),
  disk: diskRoomSchema,
});

export const runBody = z
  .object({
    image: imageRef,
    cmd: z.array(cString()).min(1),
    ...sizes,
    timeout_ms: z.number().int().min(1).max(86_400_000).nullable().default(null),
  })
  .strict()
  .superRefine((b, ctx) => checkExecFits(ctx, { argv: b.cmd, env: b.env }));

export const runResultSchema = z.object({
  exit_code: z.number().nullable(),
  stdout: z.string(),
  stderr: z.string(),
  error_message: z.string().nullable(),
  status: z.enum(['completed', 'timed_out', 'failed']),
  signal: z.number().nullable(),
});

export const gcBody = z
  .object({
    older_than: z
      .number()
      .int()
      .min(0)
      .default(0)
      .describe('Remove boxes stopped at least this many seconds ago (0: every stopped box).'),
  })
  .strict();

export const gcResultSchema = z.object({ removed: z.number(), ids: z.array(z.string()) });

/** A flag in a query: `?force`, `?force=true|1` or `?force=false|0`. */
const queryFlag = z
  .enum(['true', 'false', '1', '0', ''])
  .optional()
  .transform((v) => v === 'true' || v === '1' || v === '');

export const boxListQuery = z.object({
  status: z.enum(['running', 'stopped']).optional().describe('Only the boxes in this state.'),
});

export const removeBoxQuery = z.object({
  force: queryFlag.describe('Remove a running box too (it is stopped first).'),
});

export const boxAttachQuery = attachQuery.extend({
  shell: attachQuery.shape.shell
    .unwrap()
    .optional()
    .describe('Absolute path of the shell to run; default /bin/bash, else /bin/sh.'),
});
