import { z } from 'zod';
import type { Actions } from '../core/dispatch.js';
import type { InputAction } from '../desktop/input-types.js';
import { type ApiRoute, routesOf } from './http/routes.js';

export const screenshotQuery = z
  .object({
    scale: z.coerce.number().optional().describe('Scale factor, above 0 and at most 1 (e.g. 0.5).'),
    max_width: z.coerce
      .number()
      .int()
      .optional()
      .describe('Scale down (keeping the aspect) to at most this many pixels wide; for models.'),
    region: z
      .string()
      .regex(/^\d{1,5},\d{1,5},\d{1,5},\d{1,5}$/, 'x,y,width,height in screen pixels')
      .optional()
      .describe('Only this part of the screen: "x,y,width,height" in screen pixels (then scaled, if asked).'),
  })
  .strict();

const xy = { x: z.number().int().optional(), y: z.number().int().optional() };
const button = z.enum(['left', 'right', 'middle']).optional();

/** The actions (src/desktop/input-types.ts); src/desktop/qmp-input.ts checks the values. */
export const inputBody = z
  .object({
    actions: z
      .array(
        z.discriminatedUnion('type', [
          z.object({ type: z.literal('move'), x: z.number().int(), y: z.number().int() }).strict(),
          z.object({ type: z.literal('click'), ...xy, button, count: z.number().int().optional() }).strict(),
          z.object({ type: z.enum(['down', 'up']), ...xy, button }).strict(),
          z
            .object({
              type: z.literal('scroll'),
              ...xy,
              direction: z.enum(['up', 'down', 'left', 'right']),
              amount: z.number().int().optional(),
            })
            .strict(),
          z.object({ type: z.enum(['key', 'key_down', 'key_up']), keys: z.string() }).strict(),
          z.object({ type: z.literal('type'), text: z.string() }).strict(),
          z.object({ type: z.literal('wait'), ms: z.number().int() }).strict(),
        ]),
      )
      .min(1)
      .max(200)
      .describe(
        'Performed in order by the host (QMP), never by the guest. Pixels from the top left; key names are xdotool\'s ("Return", "ctrl+s", "ctrl+a Delete"); text is printable ASCII, tab and newline.',
      ),
  })
  .strict();

export const inputResultSchema = z.object({
  cursor: z
    .object({ x: z.number().int(), y: z.number().int() })
    .describe('Where the pointer is after the actions (as hutch moved it).'),
});

function regionOf(text: string): { x: number; y: number; width: number; height: number } {
  const [x, y, width, height] = text.split(',').map(Number) as [number, number, number, number];
  return { x, y, width, height };
}

/** A desktop machine's screen: screenshots and input (engine: src/desktop/desktop-actions.ts). */
export function desktopRoutes<A extends { act: Actions }>(): ApiRoute<A>[] {
  const route = routesOf<A>();
  return [
    route.raw({
      method: 'GET',
      path: '/v1/machines/{id}/screenshot',
      summary: 'PNG screenshot of a desktop machine (taken by the host, not the guest)',
      query: screenshotQuery,
      status: 200,
      doc: {
        responses: {
          '200': {
            description:
              'What the screen shows now (the pointer is drawn by the viewer, not in the image). X-Screen-Width/Height: the screen; the image is smaller when scaled.',
            content: { 'image/png': { schema: { type: 'string', format: 'binary' } } },
          },
        },
      },
      handle: async ({ act, params, query, res }) => {
        const shot = await act.screenshot(params.id ?? '', {
          ...(query.scale !== undefined ? { scale: query.scale } : {}),
          ...(query.max_width !== undefined ? { maxWidth: query.max_width } : {}),
          ...(query.region !== undefined ? { region: regionOf(query.region) } : {}),
        });
        res.writeHead(200, {
          'content-type': 'image/png',
          'content-length': shot.png.length,
          'cache-control': 'no-store',
          'x-screen-width': shot.screen.width,
          'x-screen-height': shot.screen.height,
        });
        res.end(shot.png);
      },
    }),
    route.json({
      method: 'POST',
      path: '/v1/machines/{id}/input',
      summary: 'Pointer and keyboard input to a desktop machine (moves, clicks, drags, scrolls, keys, text)',
      body: inputBody,
      response: inputResultSchema,
      status: 200,
      handle: ({ act, params, body }) => act.input(params.id ?? '', body.actions as InputAction[]),
    }),
  ];
}
