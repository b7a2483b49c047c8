import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import {
  createConnection,
  createServer as createNetServer,
  type Server as NetServer,
  type Socket,
} from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { WebSocket, WebSocketServer } from 'ws';
import { bridgeVnc, type VncBridgeOptions } from '../../src/desktop/vnc-bridge.js';

/**
 * VNC test plumbing: a bare QEMU whose VNC server listens on a Unix socket (no kernel, no guest:
 * QEMU serves its "Guest has not initialized the display" screen, 640x480, until a guest's
 * virtio-gpu driver sets a mode), a small WebSocket server that bridges each connection to it
 * with `bridgeVnc`, and a minimal RFB client for either transport.
 */

/** The `-vnc` option the daemon gives a desktop machine (share=force-shared: no viewer kicks another). */
export const vncOption = (sock: string): string => `unix:${sock},share=force-shared`;

export interface BareVnc {
  sock: string;
  qemu: ChildProcess;
  stop(): Promise<void>;
}

/** Starts a paused microvm with a virtio-gpu and a VNC server; resolves once the socket is there. */
export async function startBareVnc(): Promise<BareVnc> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-vnc-'));
  const sock = join(dir, 'vnc.sock');
  const qemu = spawn(
    'qemu-system-x86_64',
    [
      '-M',
      'microvm,x-option-roms=off,isa-serial=off,acpi=off',
      '-global',
      'virtio-mmio.force-legacy=false',
      '-accel',
      'tcg',
      '-m',
      '64M',
      '-device',
      'virtio-gpu-device,xres=1024,yres=768',
      '-display',
      'none',
      '-vnc',
      vncOption(sock),
      '-nodefaults',
      '-no-user-config',
      '-S',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  qemu.stderr?.on('data', (b: Buffer) => {
    stderr += b.toString();
  });
  const exited = new Promise<void>((r) => qemu.once('exit', () => r()));
  const stop = async (): Promise<void> => {
    if (qemu.exitCode === null && qemu.signalCode === null) qemu.kill('SIGKILL');
    await exited;
    rmSync(dir, { recursive: true, force: true });
  };
  const t0 = Date.now();
  while (!existsSync(sock)) {
    if (qemu.exitCode !== null || Date.now() - t0 > 10_000) {
      await stop();
      throw new Error(`QEMU's VNC socket did not appear: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { sock, qemu, stop };
}

export interface BridgeServer {
  /** ws://127.0.0.1:PORT/vnc */
  url: string;
  /** Bridges currently open (the server side of each WebSocket). */
  sockets: Set<WebSocket>;
  close(): Promise<void>;
}

/** An HTTP server whose every WebSocket is bridged to a fresh connection to `sock`. */
export async function startBridgeServer(
  sock: string,
  opts: (ws: WebSocket, vnc: Duplex) => VncBridgeOptions = () => ({}),
): Promise<BridgeServer> {
  const server: Server = createServer((_req, res) => res.writeHead(426).end());
  const wss = new WebSocketServer({ noServer: true, maxPayload: 1024 * 1024 });
  const sockets = new Set<WebSocket>();
  server.on('upgrade', (req, socket, head) => {
    const vnc = createConnection(sock);
    const refuse = (): void => {
      socket.destroy();
    };
    vnc.once('error', refuse);
    vnc.once('connect', () => {
      vnc.off('error', refuse);
      wss.handleUpgrade(req, socket, head, (ws) => {
        sockets.add(ws);
        ws.once('close', () => sockets.delete(ws));
        bridgeVnc(ws, vnc, opts(ws, vnc));
      });
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/vnc`;
  return {
    url,
    sockets,
    async close() {
      for (const ws of wss.clients) ws.terminate();
      wss.close();
      await new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections();
      });
    },
  };
}

/** Bytes in, bytes out: what an RFB client needs of its transport. */
export interface ByteLink {
  write(b: Buffer): void;
  onData(f: (b: Buffer) => void): void;
  onClose(f: () => void): void;
  close(): void;
  /** The WebSocket, for a link over one. */
  ws?: WebSocket;
}

export function wsLink(ws: WebSocket): ByteLink {
  return {
    ws,
    write: (b) => ws.send(b, { binary: true }),
    onData: (f) => ws.on('message', (d: Buffer, isBinary: boolean) => (isBinary ? f(d) : undefined)),
    onClose: (f) => ws.once('close', f),
    close: () => ws.close(),
  };
}

export function socketLink(s: Duplex): ByteLink {
  return {
    write: (b) => s.write(b),
    onData: (f) => s.on('data', f),
    onClose: (f) => s.once('close', f),
    close: () => s.destroy(),
  };
}

export async function openWs(url: string, headers?: Record<string, string>): Promise<WebSocket> {
  return opened(new WebSocket(url, { headers: headers ?? {} }));
}

/**
 * An RFB client over a WebSocket to `url`, listening from before the upgrade completes: the
 * server's first bytes (its version) can come in the same read as the 101 and be emitted
 * before an `await` on 'open' returns.
 */
export async function connectRfb(url: string, opts: { shared?: boolean } = {}): Promise<RfbClient> {
  const ws = new WebSocket(url);
  const rfb = new RfbClient(wsLink(ws), opts);
  await opened(ws);
  return rfb;
}

async function opened(ws: WebSocket): Promise<WebSocket> {
  if (ws.readyState === WebSocket.OPEN) return ws;
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => reject(new Error(`upgrade refused: ${res.statusCode}`)));
  });
  return ws;
}

export function openUnix(path: string): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    const s = createConnection(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

export interface ServerInit {
  width: number;
  height: number;
  bitsPerPixel: number;
  name: string;
}

export interface FramebufferUpdate {
  rects: number;
  /** The whole message's size. */
  bytes: number;
}

/**
 * A minimal RFB 3.8 client: security None, raw encoding only, 32 bpp as the server offers. It
 * parses what the server sends (FramebufferUpdate with raw rectangles and the pseudo-encodings
 * QEMU might send, SetColourMapEntries, Bell, ServerCutText) so messages can be counted.
 */
export class RfbClient {
  /** Received and not yet parsed: chunks (never copied together until a field needs it). */
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiting: (() => void) | undefined;
  private closedFlag = false;
  readonly version: Promise<string>;
  serverInit: ServerInit | undefined;
  private bpp = 4;
  private updateWaiters: ((u: FramebufferUpdate) => void)[] = [];
  updates = 0;
  updateBytes = 0;

  constructor(
    readonly link: ByteLink,
    private readonly opts: { shared?: boolean } = {},
  ) {
    link.onData((b) => {
      this.chunks.push(b);
      this.buffered += b.length;
      this.waiting?.();
    });
    link.onClose(() => {
      this.closedFlag = true;
      this.waiting?.();
    });
    this.version = this.take(12).then((b) => b.toString('latin1'));
  }

  /** The WebSocket under a client made by `connectRfb`. */
  get ws(): WebSocket {
    if (!this.link.ws) throw new Error('RFB: not over a WebSocket');
    return this.link.ws;
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  private async fill(n: number): Promise<void> {
    while (this.buffered < n) {
      if (this.closedFlag) throw new Error(`RFB: connection closed (wanted ${n} bytes)`);
      await new Promise<void>((r) => {
        this.waiting = r;
      });
      this.waiting = undefined;
    }
  }

  /** The next `n` bytes. */
  private async take(n: number): Promise<Buffer> {
    await this.fill(n);
    const first = this.chunks[0] as Buffer;
    let out: Buffer;
    if (first.length >= n) out = first.subarray(0, n);
    else {
      out = Buffer.alloc(n);
      let off = 0;
      for (const c of this.chunks) {
        const k = Math.min(c.length, n - off);
        c.copy(out, off, 0, k);
        off += k;
        if (off === n) break;
      }
    }
    this.drop(n);
    return out;
  }

  /** Skips `n` bytes (pixel data) without copying them. */
  private async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      await this.fill(1);
      const k = Math.min(left, this.buffered);
      this.drop(k);
      left -= k;
    }
  }

  private drop(n: number): void {
    this.buffered -= n;
    let left = n;
    while (left > 0) {
      const c = this.chunks[0] as Buffer;
      if (c.length <= left) {
        this.chunks.shift();
        left -= c.length;
      } else {
        this.chunks[0] = c.subarray(left);
        left = 0;
      }
    }
  }

  /** Version, security None, ClientInit (shared unless told), ServerInit. */
  async handshake(): Promise<ServerInit> {
    const v = await this.version;
    if (v !== 'RFB 003.008\n') throw new Error(`RFB: unexpected version ${JSON.stringify(v)}`);
    this.link.write(Buffer.from('RFB 003.008\n'));
    const n = (await this.take(1))[0] ?? 0;
    if (n === 0) throw new Error('RFB: the server refused the connection');
    const types = [...(await this.take(n))];
    if (!types.includes(1)) throw new Error(`RFB: no security type None in ${types}`);
    this.link.write(Buffer.from([1]));
    const result = (await this.take(4)).readUInt32BE(0);
    if (result !== 0) throw new Error(`RFB: security result ${result}`);
    this.link.write(Buffer.from([this.opts.shared === false ? 0 : 1]));
    const head = await this.take(24);
    const nameLength = head.readUInt32BE(20);
    const name = (await this.take(nameLength)).toString('utf8');
    this.bpp = (head[4] ?? 32) / 8;
    this.serverInit = {
      width: head.readUInt16BE(0),
      height: head.readUInt16BE(2),
      bitsPerPixel: head[4] ?? 0,
      name,
    };
    // Raw only: predictable sizes, and the most bytes per frame (what a bench wants to move).
    this.link.write(Buffer.from([2, 0, 0, 1, 0, 0, 0, 0]));
    void this.readLoop().catch(() => {});
    return this.serverInit;
  }

  /** FramebufferUpdateRequest for the whole screen. */
  request(incremental: boolean): void {
    const s = this.serverInit;
    if (!s) throw new Error('RFB: no ServerInit yet');
    const b = Buffer.alloc(10);
    b[0] = 3;
    b[1] = incremental ? 1 : 0;
    b.writeUInt16BE(s.width, 6);
    b.writeUInt16BE(s.height, 8);
    this.link.write(b);
  }

  /** A pointer event (buttons: bit mask, 1 = left). */
  pointer(x: number, y: number, buttons = 0): void {
    const b = Buffer.alloc(6);
    b[0] = 5;
    b[1] = buttons;
    b.writeUInt16BE(x, 2);
    b.writeUInt16BE(y, 4);
    this.link.write(b);
  }

  /** Resolves with the next FramebufferUpdate, rejects after `ms`. */
  nextUpdate(ms = 10_000): Promise<FramebufferUpdate> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`RFB: no FramebufferUpdate in ${ms} ms`)), ms);
      this.updateWaiters.push((u) => {
        clearTimeout(t);
        resolve(u);
      });
    });
  }

  private async readLoop(): Promise<void> {
    for (;;) {
      const type = (await this.take(1))[0];
      switch (type) {
        case 0: {
          const h = await this.take(3);
          const rects = h.readUInt16BE(1);
          let bytes = 4;
          for (let i = 0; i < rects; i++) {
            const r = await this.take(12);
            bytes += 12;
            const w = r.readUInt16BE(4);
            const hh = r.readUInt16BE(6);
            const enc = r.readInt32BE(8);
            if (enc === 0) {
              const n = w * hh * this.bpp;
              await this.skip(n);
              bytes += n;
            } else if (enc === -223) {
              // DesktopSize: the new size is the rectangle's.
              if (this.serverInit) this.serverInit = { ...this.serverInit, width: w, height: hh };
            } else {
              throw new Error(`RFB: unexpected encoding ${enc}`);
            }
          }
          this.updates++;
          this.updateBytes += bytes;
          const waiters = this.updateWaiters;
          this.updateWaiters = [];
          for (const f of waiters) f({ rects, bytes });
          break;
        }
        case 1: {
          const h = await this.take(5);
          await this.take(h.readUInt16BE(3) * 6);
          break;
        }
        case 2:
          break;
        case 3: {
          const h = await this.take(7);
          await this.take(h.readUInt32BE(3));
          break;
        }
        default:
          throw new Error(`RFB: unexpected server message ${type}`);
      }
    }
  }

  close(): void {
    this.link.close();
  }
}

/** The token the API fixture below accepts (any other is 401): a JWT's shape, not a JWT. */
export const fixtureToken = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl';

export interface VncApi {
  /** http://127.0.0.1:PORT */
  base: string;
  /** ws://127.0.0.1:PORT/v1/machines/m1/vnc?token=… */
  wsUrl: string;
  /** Marks machine m1 gone (what `act.get` reports afterwards). */
  setState(state: string): void;
  close(): Promise<void>;
}

/**
 * The real machines-API server (createApiServer) with only the real VNC route, its actions
 * faked: one machine `m1` of user alice, whose VNC server is `sock`; every other id is
 * NOT_FOUND. Bearer tokens are checked by a stand-in for AuthService.verifyBearer. The TCP
 * listener has no anonymous principal, like a non-loopback one: every request needs a token.
 */
export async function startVncApi(sock: string): Promise<VncApi> {
  const [{ createApiServer }, { machineRoutes }, { HutchError }, { localPrincipal }] = await Promise.all([
    import('../../src/api/http/server.js'),
    import('../../src/api/routes.js'),
    import('../../src/errors.js'),
    import('../../src/core/principal.js'),
  ]);
  const routes = machineRoutes.filter((r) => r.path === '/v1/machines/{id}/vnc');
  let state = 'running';
  const act = {
    openVnc: (id: string) =>
      id === 'm1'
        ? openUnix(sock)
        : Promise.reject(new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(id)}`)),
    get: (id: string) => {
      if (id !== 'm1' || state === 'destroyed') throw new HutchError('MACHINE_NOT_FOUND', `no machine ${id}`);
      return { id, status: state };
    },
  };
  const api = createApiServer(
    routes,
    () => ({ act }) as unknown as import('../../src/api/machine-channels.js').MachinesApp,
    {
      verifyBearer: async (h) => {
        if (h !== `Bearer ${fixtureToken}`) throw new HutchError('UNAUTHENTICATED', 'invalid token');
        return localPrincipal('alice', 'token');
      },
    },
  );
  const base = await api.listenTcp('127.0.0.1', 0);
  return {
    base,
    wsUrl: `${base.replace(/^http/, 'ws')}/v1/machines/m1/vnc?token=${fixtureToken}`,
    setState: (s) => {
      state = s;
    },
    close: () => api.close(),
  };
}

/**
 * An RFB server that answers every FramebufferUpdateRequest at once with a full raw 1024x768x32
 * frame (3 MiB): QEMU serves requests on its refresh timer (a static screen backs it off to a
 * few a second), so this is what shows the bridge's own ceiling, and what floods a viewer that
 * never reads. `readAfterHandshake: false`: a server that stops reading (input backs up).
 */
export async function startSyntheticRfb(
  opts: { readAfterHandshake?: boolean } = {},
): Promise<{ sock: string; close(): Promise<void> }> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-vnc-bench-'));
  const sock = join(dir, 'rfb.sock');
  const w = 1024;
  const h = 768;
  const frame = Buffer.alloc(4 + 12 + w * h * 4);
  frame.writeUInt16BE(1, 2);
  frame.writeUInt16BE(w, 8);
  frame.writeUInt16BE(h, 10);
  for (let i = 16; i < frame.length; i += 4) frame.writeUInt32LE((i * 2654435761) >>> 0, i);
  const init = Buffer.alloc(24 + 9);
  init.writeUInt16BE(w, 0);
  init.writeUInt16BE(h, 2);
  init.set([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0], 4);
  init.writeUInt32BE(9, 20);
  init.write('synthetic', 24);
  const serve = (c: Socket): void => {
    c.on('error', () => {});
    let buf = Buffer.alloc(0);
    let stage = 0;
    let answering = Promise.resolve();
    c.write('RFB 003.008\n');
    c.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const need = stage === 0 ? 12 : stage === 1 || stage === 2 ? 1 : messageSize(buf);
        if (need === undefined || buf.length < need) return;
        const msg = buf.subarray(0, need);
        buf = buf.subarray(need);
        if (stage === 0) c.write(Buffer.from([1, 1]));
        else if (stage === 1) c.write(Buffer.alloc(4));
        else if (stage === 2) {
          c.write(init);
          if (opts.readAfterHandshake === false) c.pause();
        } else if (msg[0] === 3)
          answering = answering.then(
            () => new Promise<void>((r) => (c.write(frame) ? r() : c.once('drain', () => r()))),
          );
        if (stage < 3) stage++;
      }
    });
  };
  const conns = new Set<Socket>();
  const server: NetServer = createNetServer((c) => {
    conns.add(c);
    c.once('close', () => conns.delete(c));
    serve(c);
  });
  await new Promise<void>((r) => server.listen(sock, () => r()));
  return {
    sock,
    close: async () => {
      for (const c of conns) c.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The size of the client message at the head of `b`, once its header is there. */
function messageSize(b: Buffer): number | undefined {
  switch (b[0]) {
    case undefined:
      return undefined;
    case 0:
      return 20;
    case 2:
      return b.length < 4 ? undefined : 4 + 4 * b.readUInt16BE(2);
    case 3:
      return 10;
    case 4:
      return 8;
    case 5:
      return 6;
    case 6:
      return b.length < 8 ? undefined : 8 + b.readUInt32BE(4);
    default:
      throw new Error(`synthetic RFB: unknown client message ${b[0]}`);
  }
}
