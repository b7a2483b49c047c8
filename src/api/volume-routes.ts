import { z } from 'zod';
import { HutchError } from '../errors.js';
import { volumeTtl } from '../storage/volumes/volume-service.js';
import { attachmentDisposition } from './content-disposition.js';
import { writeRespectingBackpressure } from './exec-stream.js';
import { type ApiRoute, routesOf } from './http/routes.js';
import type { MachinesApp } from './machine-channels.js';

const route = routesOf<MachinesApp>();

const binary = { schema: { type: 'string', contentMediaType: 'application/octet-stream' } };

export const volumeSchema = z.object({
  id: z.string().describe('"vol-" and 26 base32 characters (128 random bits).'),
  created_at: z.string(),
  expires_at: z.string().describe('When the volume and everything in it is collected.'),
  ttl_seconds: z.number().int(),
  bytes: z.number().int().describe('Sum of the sizes of its files.'),
  files: z.number().int(),
  dirs: z.number().int(),
  symlinks: z.number().int(),
  generation: z.number().int().describe('Versions committed so far (saves and uploads); 0: empty.'),
  updated_at: z.string().describe('When the current version was committed.'),
});

export const volumeFileSchema = z.object({
  path: z.string().describe('Relative to the volume root.'),
  type: z.enum(['file', 'dir', 'symlink']),
  mode: z.string().describe('Octal permission bits with setuid/setgid/sticky, e.g. "0644", "4755".'),
  uid: z.number().int(),
  gid: z.number().int(),
  size: z.number().int(),
  mtime: z.string(),
  target: z.string().optional().describe("A symlink's target, as stored (never followed by the server)."),
});

export const createVolumeBody = z
  .object({
    ttl_seconds: z
      .number()
      .int()
      .min(volumeTtl.min)
      .max(volumeTtl.max)
      .optional()
      .describe(`Seconds until the volume is collected; ${volumeTtl.min}–${volumeTtl.max}, default 7 days.`),
  })
  .strict();

const pathParam = z
  .string()
  .max(8192)
  .optional()
  .describe('A path inside the volume ("/" or nothing first: the volume root); no "..", no NUL.');

export const volumeFileQuery = z.object({ path: pathParam });

export const putFileQuery = z.object({
  path: pathParam,
  mode: z
    .string()
    .regex(/^[0-7]{1,4}$/, 'octal permission bits, e.g. 644 or 0755')
    .optional()
    .describe('Octal permission bits of the file (default 0644).'),
});

export const saveQuery = z.object({
  volume: z.string().max(64).describe('The volume to save into (its id).'),
});

export const saveResultSchema = z.object({
  machine: z.string(),
  volume: volumeSchema,
  files: z.number().int(),
  bytes: z.number().int(),
  skipped: z
    .object({ devices: z.number(), fifos: z.number(), other: z.number(), bad_names: z.number() })
    .describe('Entries not kept: device nodes, FIFOs, other types, names that are not UTF-8.'),
  warnings: z.string().describe("tar's stderr when it succeeded with warnings (files changed while read)."),
  duration_ms: z.number().int(),
});

const putResultSchema = z.object({ path: z.string(), size: z.number().int(), volume: volumeSchema });

/**
 * Persistent volumes (docs/volumes.md): routes only parse and call the volume actions; uploads
 * and downloads move bytes between the request and the store as they come.
 */
export const volumeRoutes: ApiRoute<MachinesApp>[] = [
  route.json({
    method: 'POST',
    path: '/v1/volumes',
    summary: 'Create a volume',
    body: createVolumeBody,
    response: volumeSchema,
    status: 201,
    handle: ({ act, body }) =>
      act.createVolume(body.ttl_seconds !== undefined ? { ttlSeconds: body.ttl_seconds } : {}),
  }),
  route.json({
    method: 'GET',
    path: '/v1/volumes',
    summary: 'Your volumes',
    response: z.object({ volumes: z.array(volumeSchema) }),
    status: 200,
    handle: async ({ act }) => ({ volumes: await act.listVolumes() }),
  }),
  route.json({
    method: 'GET',
    path: '/v1/volumes/{id}',
    summary: 'A volume: metadata and usage',
    response: volumeSchema,
    status: 200,
    handle: ({ act, params }) => act.getVolume(params.id ?? ''),
  }),
  route.json({
    method: 'DELETE',
    path: '/v1/volumes/{id}',
    summary: 'Delete a volume now (VOLUME_BUSY while a save, restore, upload or download uses it)',
    status: 204,
    handle: async ({ act, params }) => {
      await act.deleteVolume(params.id ?? '');
      return undefined;
    },
  }),
  route.json({
    method: 'GET',
    path: '/v1/volumes/{id}/files',
    summary: "Every entry of the volume's current version",
    response: z.object({ files: z.array(volumeFileSchema) }),
    status: 200,
    handle: async ({ act, params }) => ({ files: await act.listVolumeFiles(params.id ?? '') }),
  }),
  route.raw({
    method: 'PUT',
    path: '/v1/volumes/{id}/file',
    summary: 'Upload a file into the volume (the request body, streamed; any size up to the limit)',
    query: putFileQuery,
    status: 200,
    doc: {
      requestBody: { required: true, content: { 'application/octet-stream': binary } },
      responses: {
        '200': {
          description:
            'Stored: the volume has a new version with this file (missing parent directories added, 0755)',
          content: { 'application/json': { schema: z.toJSONSchema(putResultSchema) } },
        },
      },
    },
    handle: async ({ act, params, query, req }) => {
      const len = req.headers['content-length'];
      try {
        return await act.putVolumeFile(params.id ?? '', query.path, req, {
          ...(query.mode !== undefined ? { mode: Number.parseInt(query.mode, 8) } : {}),
          ...(len !== undefined && /^\d+$/.test(len) ? { size: Number(len) } : {}),
        });
      } catch (e) {
        // A body that stopped coming is the client's doing, whatever the store made of it.
        if (!(e instanceof HutchError) && (req.destroyed || !req.complete))
          throw new HutchError('INVALID_ARGUMENT', `the upload ended early: ${(e as Error).message}`);
        throw e;
      }
    },
  }),
  route.raw({
    method: 'GET',
    path: '/v1/volumes/{id}/file',
    summary: 'Download a file from the volume (streamed)',
    query: volumeFileQuery,
    status: 200,
    doc: {
      responses: {
        '200': {
          description: 'The file; content-length is its size',
          content: { 'application/octet-stream': binary },
        },
      },
    },
    handle: async ({ act, params, query, res }) => {
      const f = await act.getVolumeFile(params.id ?? '', query.path);
      res.writeHead(200, {
        'content-type': 'application/octet-stream',
        'content-length': f.size,
        'content-disposition': attachmentDisposition(f.path.slice(f.path.lastIndexOf('/') + 1)),
      });
      try {
        for await (const b of f.stream as AsyncIterable<Buffer>) await writeRespectingBackpressure(res, b);
        res.end();
      } catch (e) {
        // Headers are out: the client sees a short body, never a wrong one.
        res.destroy(e as Error);
      } finally {
        f.stream.destroy();
      }
      return undefined;
    },
  }),
  route.json({
    method: 'POST',
    path: '/v1/machines/{id}/save',
    summary: "Save the machine's /root into a volume (its new version)",
    description:
      'Runs tar in the machine and stores what it sends: files, directories, symlinks (as they are), modes, owners and mtimes; hard links become copies, devices and FIFOs are left out. Until it commits, the volume keeps its previous version.',
    query: saveQuery,
    response: saveResultSchema,
    status: 200,
    handle: ({ act, params, query }) => act.saveMachine(params.id ?? '', query.volume),
  }),
];
