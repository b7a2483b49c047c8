import type { WebSocket } from 'ws';
import { bridgeVnc } from '../desktop/vnc-bridge.js';
import type { RequestParts } from './http/routes.js';
import type { MachinesApp } from './machine-channels.js';

/**
 * The desktop's WebSocket channels: only moves bytes; who may open what is the action's
 * (`act.openVnc`), the protocol is QEMU's.
 */

/** Whether the machine is gone (or no longer running): the reason a viewer is told, else undefined. */
function goneReason(ctx: MachinesApp, id: string): string | undefined {
  let state: string;
  try {
    state = ctx.act.get(id).status;
  } catch {
    state = 'destroyed';
  }
  return state === 'running' || state === 'paused' ? undefined : `machine ${id} went away (${state})`;
}

// ---- WebSocket /v1/machines/{id}/vnc ------------------------------------------------------------

export async function vnc(
  ctx: MachinesApp & RequestParts<undefined, undefined> & { accept: () => Promise<WebSocket> },
): Promise<void> {
  const id = ctx.params.id ?? '';
  // Refused (404, 409 NO_DISPLAY, …) before the upgrade, as an ordinary HTTP error.
  const socket = await ctx.act.openVnc(id);
  let ws: WebSocket;
  try {
    ws = await ctx.accept();
  } catch (e) {
    socket.destroy();
    throw e;
  }
  bridgeVnc(ws, socket, { goneReason: () => goneReason(ctx, id) });
}
