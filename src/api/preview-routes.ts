import type { IncomingMessage } from 'node:http';
import { z } from 'zod';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';
import type { PreviewProxy } from '../net/preview/preview-proxy.js';
import { parsePort } from '../net/preview/preview-target.js';
import { type ApiRoute, routesOf } from './http/routes.js';

/** What the preview routes' handlers need: the caller and the previews (absent: not served). */
export interface PreviewApp {
  me: Principal | null;
  previews?: PreviewProxy | undefined;
}

const route = routesOf<PreviewApp>();

export const previewPortSchema = z.object({
  port: z.number().int(),
  public: z.boolean().describe('Served to anyone with the URL, without credentials.'),
  url: z.string().describe('Where the preview is served.'),
});

export const setPublicBody = z.object({ public: z.boolean() }).strict();

function previewsOf(app: PreviewApp): { previews: PreviewProxy; me: Principal } {
  if (!app.previews) throw new HutchError('NOT_SERVED', 'web previews are not served by this daemon');
  if (!app.me) throw new HutchError('UNAUTHENTICATED', 'this request needs credentials');
  return { previews: app.previews, me: app.me };
}

const portOf = (v: string | undefined): number => parsePort(v ?? '');

/**
 * The API side of web previews (the proxying itself is net/preview/preview-proxy.ts, in front
 * of every route): which ports a machine has, and which are public.
 */
export const previewRoutes: ApiRoute<PreviewApp>[] = [
  route.json({
    method: 'GET',
    path: '/v1/machines/{id}/ports',
    summary: 'The TCP ports the machine listens on and its public ports, with their preview URLs',
    response: z.object({ ports: z.array(previewPortSchema) }),
    status: 200,
    handle: (ctx) => {
      const { previews, me } = previewsOf(ctx);
      return previews.ports(me, ctx.params.id ?? '', ctx.req as IncomingMessage);
    },
  }),
  route.json({
    method: 'PUT',
    path: '/v1/machines/{id}/web/{port}/public',
    summary: "Make a port's preview public (served without credentials) or private again",
    description:
      'Owner only. A public port is served to anyone who has its URL (with the machine id, not its name); everything else about the preview is unchanged. See docs/previews.md.',
    body: setPublicBody,
    response: previewPortSchema,
    status: 200,
    handle: (ctx) => {
      const { previews, me } = previewsOf(ctx);
      return previews.setPublic(me, ctx.params.id ?? '', portOf(ctx.params.port), ctx.body.public, ctx.req);
    },
  }),
];
