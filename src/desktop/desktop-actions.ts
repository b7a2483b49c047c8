import { createConnection } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';

/**
 * The desktop's actions (core/dispatch.ts `on: 'desktop'`). Minimal for now: a connection to a
 * machine's VNC server, QEMU's `-vnc unix:<run dir>/vnc.sock`. `vncSocketOf` decides whose
 * machine it is (another owner's is NOT_FOUND) and whether it runs, and names its socket.
 */
export class DesktopActions {
  constructor(private readonly vncSocketOf: (p: Principal, id: string) => string) {}

  /** A connected socket to the machine's VNC server (RFB 003.008, security None). */
  openVnc(p: Principal, id: string): Promise<Duplex> {
    const path = this.vncSocketOf(p, id);
    return new Promise<Duplex>((resolve, reject) => {
      const s = createConnection(path);
      s.once('connect', () => {
        s.off('error', onError);
        resolve(s);
      });
      const onError = (e: NodeJS.ErrnoException): void => {
        s.destroy();
        reject(
          e.code === 'ENOENT' || e.code === 'ECONNREFUSED'
            ? new HutchError('NO_DISPLAY', `machine ${id} has no VNC server (no display)`)
            : e,
        );
      };
      s.once('error', onError);
    });
  }
}
