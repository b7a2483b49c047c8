import { z } from 'zod';
import type { Actions } from '../core/dispatch.js';
import { type ApiRoute, routesOf } from './http/routes.js';

export const createDiskBody = z
  .object({
    name: z
      .string()
      .min(1)
      .max(63)
      .describe('Unique among your disks: [A-Za-z0-9._-], starting with a letter or digit'),
    size_bytes: z
      .number()
      .int()
      .min(0)
      .max(2 ** 53 - 1)
      .optional()
      .describe('The disk size; rounded up to MiB. 0 or absent: 10 GiB. At most HUTCH_DISK_MAX_BYTES.'),
  })
  .strict();

export const attachDiskBody = z
  .object({
    disk: z.string().min(1).max(128).describe('The disk id or name'),
    mount_path: z.string().min(1).max(200).describe('Absolute path in the guest where it is mounted'),
    read_only: z
      .boolean()
      .optional()
      .describe('Mounted read-only (a disk may be read-only on several machines)'),
  })
  .strict();

export const diskSchema = z.object({
  disk_id: z.string(),
  name: z.string(),
  size_bytes: z.number().int(),
  used_bytes: z.number().int().describe('What the disk holds on the host (what guests wrote)'),
  status: z.enum(['ready', 'attached']),
  worker_id: z.string().describe('The host holding the disk'),
  created_at: z.string(),
  attachments: z.array(
    z.object({
      vm_id: z.string(),
      vm_name: z.string(),
      mount_path: z.string(),
      mount_mode: z.enum(['ro', 'rw']),
    }),
  ),
});

export const diskListSchema = z.object({ disks: z.array(diskSchema) });

/**
 * Disks on REST (engine/disk-actions.ts), the same operations as gRPC's *Disk RPCs: the disks
 * themselves, and attach/detach on a machine (`/v1/machines/{id}/disks`) or a box
 * (`/v1/boxes/{id}/disks`). Attach answers once the disk is mounted in the guest.
 */
export function diskRoutes<A extends { act: Actions }>(owner: 'machines' | 'boxes'): ApiRoute<A>[] {
  const route = routesOf<A>();
  const what = owner === 'machines' ? 'machine' : 'box';
  // The machines API names only machines, the boxes API only boxes.
  const kind = what;
  return [
    route.json({
      method: 'POST',
      path: '/v1/disks',
      summary: 'Create a disk (a sparse ext4 image on this host)',
      body: createDiskBody,
      response: diskSchema,
      status: 201,
      handle: ({ act, body }) => act.createDisk({ name: body.name, sizeBytes: body.size_bytes ?? 0 }),
    }),
    route.json({
      method: 'GET',
      path: '/v1/disks',
      summary: 'Your disks, with where each is attached',
      response: diskListSchema,
      status: 200,
      handle: ({ act }) => ({ disks: act.listDisks() }),
    }),
    route.json({
      method: 'GET',
      path: '/v1/disks/{id}',
      summary: 'One disk',
      response: diskSchema,
      status: 200,
      handle: ({ act, params }) => act.getDisk(params.id ?? ''),
    }),
    route.json({
      method: 'DELETE',
      path: '/v1/disks/{id}',
      summary: 'Destroy a disk and its data (refused while it is attached)',
      status: 204,
      handle: async ({ act, params }) => {
        await act.destroyDisk(params.id ?? '');
        return undefined;
      },
    }),
    route.json({
      method: 'GET',
      path: `/v1/${owner}/{id}/disks`,
      summary: `The disks attached to a ${what}`,
      response: diskListSchema,
      status: 200,
      handle: ({ act, params }) => ({ disks: act.disksOf(params.id ?? '', kind) }),
    }),
    route.json({
      method: 'POST',
      path: `/v1/${owner}/{id}/disks`,
      summary: `Attach a disk to a running ${what}: mounted at mount_path before this answers`,
      body: attachDiskBody,
      response: diskSchema,
      status: 200,
      handle: ({ act, params, body }) =>
        act.attachDisk({
          disk: body.disk,
          vm: params.id ?? '',
          mountPath: body.mount_path,
          readOnly: body.read_only === true,
          kind,
        }),
    }),
    route.json({
      method: 'DELETE',
      path: `/v1/${owner}/{id}/disks/{disk}`,
      summary: `Detach a disk from a ${what}: unmounted (written back) and unplugged; refused while files are open there`,
      response: diskSchema,
      status: 200,
      handle: ({ act, params }) => act.detachDisk({ disk: params.disk ?? '', vm: params.id ?? '', kind }),
    }),
  ];
}
