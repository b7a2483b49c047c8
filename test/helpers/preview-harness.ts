/**
 * Web previews without VMs: the real API server (src/api/http/server.ts) with the preview proxy
 * in front, the real AuthService and NetStore (SQLite in a temp dir), and real servers standing
 * in for the guest's (HTTP, WebSocket echo, streams, a flood, a slowloris). The PortOpener is the
 * one thing that differs from a daemon: it connects to 127.0.0.1:port on this host instead of
 * through a guest agent. Run as a script, it starts in its own process and prints what a test
 * needs as one JSON line (the hostile suite measures that process's memory).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { type AddressInfo, connect, createServer as createNetServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';
import { routesOf } from '../../src/api/http/routes.js';
import { createApiServer } from '../../src/api/http/server.js';
import { type PreviewApp, previewRoutes } from '../../src/api/preview-routes.js';
import { AuthService } from '../../src/auth/auth-service.js';
import { loadConfig } from '../../src/config.js';
import type { Principal } from '../../src/core/principal.js';
import { HutchError } from '../../src/errors.js';
import { NetStore } from '../../src/net/net-store.js';
import { type PortOpener, PreviewProxy } from '../../src/net/preview/preview-proxy.js';

export const publicDomain = 'preview.test';

export interface HarnessInfo {
  /** Requires a bearer token (or a grant, or a public port). */
  url: string;
  /** Its requests without a token act as alice (a loopback listener's local admin). */
  adminUrl: string;
  /** Routes by Host under `publicDomain` (bearer tokens required, like `url`). */
  hostUrl: string;
  /** `url`'s server over TLS, with `cert` (PEM) to trust. */
  tlsUrl: string;
  cert: string;
  /** `short` expires 2 s after the harness starts. */
  tokens: { alice: string; aliceJti: string; bob: string; short: string };
  machines: { alice: string; aliceName: string; bob: string };
  /** Guest ports (ports of servers on this host). */
  ports: { web: number; other: number; refused: number; slowloris: number; flood: number; garbage: number };
  pid: number;
}

export interface Harness extends HarnessInfo {
  auth: AuthService;
  net: NetStore;
  close(): Promise<void>;
}

interface MachineRow {
  id: string;
  owner: string;
  name: string;
}

const listen = (s: Server | ReturnType<typeof createNetServer>): Promise<number> =>
  new Promise((resolve) => s.listen(0, '127.0.0.1', () => resolve((s.address() as AddressInfo).port)));

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The guest's web app: echoes, redirects, cookies, streams, resets, and a WebSocket echo. */
function webApp(req: IncomingMessage, res: ServerResponse): void {
  const path = req.url ?? '/';
  if (path.startsWith('/redirect-abs')) {
    res.writeHead(302, { location: `http://${req.headers.host}/landing?a=1` }).end();
  } else if (path.startsWith('/redirect-local')) {
    res.writeHead(302, { location: `http://localhost:${req.socket.localPort}/x` }).end();
  } else if (path.startsWith('/redirect-away')) {
    res.writeHead(302, { location: 'https://example.org/elsewhere' }).end();
  } else if (path.startsWith('/redirect')) {
    res.writeHead(302, { location: '/landing' }).end();
  } else if (path.startsWith('/cookies')) {
    res.writeHead(200, {
      'set-cookie': [
        'a=1; Path=/app; HttpOnly',
        'b=2',
        'hutch_preview=evil; Path=/',
        'c=3; Domain=example.com; Path=/',
        'd=4; Path=/../../../v1',
      ],
    });
    res.end('ok');
  } else if (path.startsWith('/stream')) {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.write('first\n');
    setTimeout(() => res.end('second\n'), 1000);
  } else if (path.startsWith('/sse')) {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    let n = 0;
    const t = setInterval(() => {
      res.write(`data: ${n}\n\n`);
      if (++n === 3) {
        clearInterval(t);
        res.end();
      }
    }, 300);
  } else if (path.startsWith('/huge-headers')) {
    res.writeHead(200, { 'x-big': 'a'.repeat(100_000) }).end('big');
  } else if (path.startsWith('/reset')) {
    res.writeHead(200, { 'content-length': 100_000 });
    res.write(Buffer.alloc(1000, 'x'));
    setTimeout(() => req.socket.destroy(), 100);
  } else {
    const hash = createHash('sha256');
    let length = 0;
    req.on('data', (b: Buffer) => {
      hash.update(b);
      length += b.length;
    });
    req.on('end', () => {
      const body = JSON.stringify({
        method: req.method,
        url: req.url,
        headers: req.headers,
        bodyLength: length,
        bodySha256: hash.digest('hex'),
      });
      res.writeHead(200, { 'content-type': 'application/json' }).end(body);
    });
  }
}

/** Writes without end, as fast as the reader takes it (and no faster). */
function flood(s: Duplex): void {
  const chunk = Buffer.alloc(64 * 1024, 'f');
  const more = (): void => {
    while (!s.destroyed && s.write(chunk)) {
      // keep writing until the socket says stop
    }
  };
  s.on('drain', more);
  s.on('error', () => {});
  more();
}

function selfSignedCert(dir: string): { cert: Buffer; key: Buffer } {
  const key = join(dir, 'key.pem');
  const cert = join(dir, 'cert.pem');
  execFileSync(
    'openssl',
    [
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      key,
      '-out',
      cert,
      '-days',
      '1',
      '-subj',
      '/CN=localhost',
      '-addext',
      'subjectAltName=DNS:localhost,IP:127.0.0.1',
    ],
    { stdio: 'ignore' },
  );
  return { cert: readFileSync(cert), key: readFileSync(key) };
}

export async function startPreviewHarness(opts: { timeoutMs?: number } = {}): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-preview-'));
  const config = loadConfig({ stateDir: dir }, {});
  const auth = AuthService.open(dir, config);
  auth.addUser('alice');
  auth.addUser('bob');
  const alice = await auth.createToken(auth.principalFor('alice', 'token'), 3600);
  const bob = await auth.createToken(auth.principalFor('bob', 'token'), 3600);
  const short = await auth.createToken(auth.principalFor('alice', 'token'), 2);
  const net = new NetStore(join(dir, 'net.db'));

  const machines: MachineRow[] = [
    { id: 'm-a11ce001', owner: 'alice', name: 'web' },
    { id: 'm-b0b00002', owner: 'bob', name: 'bobweb' },
  ];
  const findMachine = (p: Principal, ref: string): { id: string } => {
    const m = machines.find((r) => r.owner === p.user && (r.id === ref || r.name === ref));
    if (!m) throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(ref)}`);
    return { id: m.id };
  };
  // What Engine.openPort does, minus the guest: the machine must be the caller's, and a port
  // nothing accepts on is PORT_NOT_LISTENING.
  const openPort: PortOpener = (p, ref, port) =>
    new Promise((resolve, reject) => {
      try {
        findMachine(p, ref);
      } catch (e) {
        reject(e);
        return;
      }
      const s: Socket = connect(port, '127.0.0.1');
      s.once('connect', () => resolve(s));
      s.once('error', (e) =>
        reject(new HutchError('PORT_NOT_LISTENING', `nothing listens on port ${port} (${e.message})`)),
      );
    });

  const servers: { close(): void }[] = [];
  const web = createServer(webApp);
  const wss = new WebSocketServer({ server: web });
  wss.on('connection', (ws) => ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary })));
  const other = createServer((_req, res) => res.end('other'));
  const floodServer = createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    flood(res as unknown as Duplex);
  });
  floodServer.on('upgrade', (_req, socket: Duplex) => {
    socket.write('HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: flood\r\n\r\n');
    flood(socket);
  });
  const slowloris = createNetServer((s) => {
    s.on('error', () => {});
    s.write('HTTP/1.1 200 OK\r\n');
    const t = setInterval(() => s.write('x-slow: y\r\n'), 200);
    s.on('close', () => clearInterval(t));
  });
  const garbage = createNetServer((s) => {
    s.on('error', () => {});
    s.end('SSH-2.0-OpenSSH_9.2\r\n\0\0\0garbage');
  });
  const gone = createNetServer();
  const ports = {
    web: await listen(web),
    other: await listen(other),
    flood: await listen(floodServer),
    slowloris: await listen(slowloris),
    garbage: await listen(garbage),
    refused: await listen(gone),
  };
  await new Promise<void>((r) => gone.close(() => r()));
  servers.push(web, other, floodServer, slowloris, garbage, wss);

  const listeningPorts = async (): Promise<number[]> => [ports.web, ports.other];
  const proxyDeps = { auth, net, findMachine, openPort, listeningPorts, timeoutMs: opts.timeoutMs ?? 1500 };
  const whoami = routesOf<PreviewApp>().json({
    method: 'GET',
    path: '/v1/whoami',
    summary: 'who',
    status: 200,
    handle: ({ me }) => ({ user_id: me?.user }),
  });
  const routes = [...previewRoutes, whoami];
  const verifyBearer = (h: string): Promise<Principal> => auth.verifyBearer(h);

  const previews = new PreviewProxy(proxyDeps);
  const api = createApiServer(routes, (me) => ({ me, previews }), { verifyBearer, front: previews });
  const url = await api.listenTcp('127.0.0.1', 0);
  const adminUrl = await api.listenTcp('127.0.0.1', 0, () => auth.principalFor('alice', 'local'));
  const tls = selfSignedCert(dir);
  const tlsUrl = (await api.listenTcp('127.0.0.1', 0, undefined, tls)).replace('127.0.0.1', 'localhost');

  const hostPreviews = new PreviewProxy({ ...proxyDeps, publicDomain });
  const hostApi = createApiServer(routes, (me) => ({ me, previews: hostPreviews }), {
    verifyBearer,
    front: hostPreviews,
  });
  const hostUrl = await hostApi.listenTcp('127.0.0.1', 0);
  const db = net.database;
  const now = Math.floor(Date.now() / 1000);
  db.prepare('INSERT INTO proxies VALUES (?, ?, ?, ?, ?, ?)').run(
    'px1',
    'alice',
    'shop',
    'm-a11ce001',
    ports.web,
    now,
  );
  db.prepare('INSERT INTO proxies VALUES (?, ?, ?, ?, ?, ?)').run(
    'px2',
    'alice',
    'auto',
    'm-a11ce001',
    0,
    now,
  );
  db.prepare('INSERT INTO domains VALUES (?, ?, ?, ?, ?)').run(
    'www.alice.example',
    'alice',
    'm-a11ce001',
    ports.web,
    now,
  );

  return {
    url,
    adminUrl,
    hostUrl,
    tlsUrl,
    cert: tls.cert.toString(),
    tokens: { alice: alice.token, aliceJti: alice.jti, bob: bob.token, short: short.token },
    machines: { alice: 'm-a11ce001', aliceName: 'web', bob: 'm-b0b00002' },
    ports,
    pid: process.pid,
    auth,
    net,
    close: async () => {
      await Promise.all([api.close(), hostApi.close()]);
      for (const s of servers) s.close();
      web.closeAllConnections();
      floodServer.closeAllConnections();
      await sleep(10);
      net.close();
      auth.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// As a script: a harness in a process of its own, described on stdout, until stdin closes.
if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const h = await startPreviewHarness({ timeoutMs: Number(process.env.PREVIEW_TIMEOUT_MS ?? 1500) });
  const { auth: _a, net: _n, close, ...info } = h;
  process.stdout.write(`${JSON.stringify(info)}\n`);
  process.stdin.resume();
  process.stdin.on('end', () => {
    void close().then(() => process.exit(0));
  });
}
