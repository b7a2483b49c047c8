import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, request, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { root } from './daemon.js';

/**
 * A real S3-compatible server for the volume tests: s3rver (pure Node, multipart uploads and
 * ranged GETs, see docs/volumes.md) in a child process on a random port with a temporary
 * directory, behind a small HTTP proxy in this process that can fail requests on demand (503s or
 * connection resets, to exercise the SDK's retries). `url` is the proxy's; `kill` SIGKILLs the
 * server (an S3 that goes away mid-transfer) and `restart` brings it back on the same data.
 */
export interface S3Server {
  url: string;
  bucket: string;
  /** Requests the proxy has forwarded or failed. */
  requests: () => number;
  /**
   * The next `n` requests are answered 503 SlowDown, have their connection reset, or (`cut`)
   * get the server's headers and part of its body, then a reset.
   */
  failNext(n: number, how?: FailHow): void;
  kill(): Promise<void>;
  restart(): Promise<void>;
  stop(): Promise<void>;
}

type FailHow = '503' | 'reset' | 'cut';

function spawnServer(
  dir: string,
  bucket: string,
  port: number,
): Promise<{ proc: ChildProcess; port: number }> {
  const proc = spawn(
    'node',
    [join(root, 'dist', 'test', 'helpers', 's3-server-main.js'), dir, bucket, String(port)],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`s3rver did not start: ${out}`)), 30_000);
    proc.stdout?.on('data', (b: Buffer) => {
      out += b.toString();
      const m = /listening (\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, port: Number(m[1]) });
      }
    });
    proc.stderr?.on('data', (b: Buffer) => {
      out += b.toString();
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`s3rver exited (${code}): ${out}`));
    });
  });
}

export async function startS3Server(bucket = 'hutch-test'): Promise<S3Server> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-s3-'));
  let server = await spawnServer(dir, bucket, 0);
  let count = 0;
  let failing = 0;
  let failHow: FailHow = '503';
  const sockets = new Set<Socket>();
  const proxy: Server = createServer((req, res) => {
    count++;
    let cutting = false;
    if (failing > 0) {
      failing--;
      if (failHow === 'reset') {
        req.socket.destroy();
        return;
      }
      if (failHow === '503') {
        req.resume();
        req.on('end', () => {
          const body =
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>injected by the test</Message></Error>';
          res.writeHead(503, {
            'content-type': 'application/xml',
            'content-length': Buffer.byteLength(body),
          });
          res.end(body);
        });
        return;
      }
      cutting = true;
    }
    const up = request(
      { host: '127.0.0.1', port: server.port, method: req.method, path: req.url, headers: req.headers },
      (ures) => {
        res.writeHead(ures.statusCode ?? 502, ures.headers);
        if (cutting) {
          // Headers and the first half of the first chunk, then the connection goes.
          ures.once('data', (b: Buffer) => {
            res.write(b.subarray(0, Math.floor(b.length / 2)), () => req.socket.destroy());
            ures.destroy();
          });
          return;
        }
        ures.pipe(res);
        ures.on('error', () => res.destroy());
      },
    );
    // The server went away: so does the client's connection (what a dead S3 looks like).
    up.on('error', () => req.socket.destroy());
    req.pipe(up);
    req.on('error', () => up.destroy());
    res.on('close', () => {
      if (!res.writableFinished) up.destroy();
    });
  });
  proxy.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
  const port = (proxy.address() as AddressInfo).port;
  const killServer = async (signal: NodeJS.Signals): Promise<void> => {
    const p = server.proc;
    if (p.exitCode !== null || p.signalCode !== null) return;
    await new Promise<void>((r) => {
      p.once('exit', () => r());
      p.kill(signal);
    });
  };
  return {
    url: `http://127.0.0.1:${port}`,
    bucket,
    requests: () => count,
    failNext: (n, how = '503') => {
      failing = n;
      failHow = how;
    },
    kill: () => killServer('SIGKILL'),
    restart: async () => {
      await killServer('SIGKILL');
      server = await spawnServer(dir, bucket, server.port).catch(() => spawnServer(dir, bucket, 0));
    },
    stop: async () => {
      await killServer('SIGKILL');
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => proxy.close(() => r()));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
