import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, renameSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AgentConnection, connectAgent } from '../../src/guest/agent-connection.js';
import {
  encodeFrame,
  type Frame,
  FrameDecoder,
  FrameType,
  SequenceScanner,
} from '../../src/guest/protocol.js';
import { encodeHello, encodePing } from '../../src/guest/protocol-messages.js';

/** The repository root: the nearest directory above this file holding package.json. */
export function repoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(path.join(dir, 'package.json'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new Error('package.json not found above the test file');
    dir = up;
  }
}

/** Path of the agent binary, building it (`make -C agent`) if it is missing. */
export function agentBinary(): string {
  const root = repoRoot();
  const bin = path.join(root, 'agent', 'build', 'hutch-agent');
  if (!existsSync(bin)) {
    execFileSync('make', ['-C', path.join(root, 'agent')], { stdio: ['ignore', 'ignore', 'inherit'] });
  }
  if (!existsSync(bin)) throw new Error(`make -C agent did not produce ${bin}`);
  return bin;
}

/**
 * The last commit whose agent speaks protocol 1 (no HELLO): machines booted before the upgrade
 * run this agent, and a daemon must keep working with them.
 */
export const PREVIOUS_AGENT_COMMIT = '77b0647';

/** That agent, built from the commit's agent/ sources (git archive) into a cache on first use. */
export function previousAgentBinary(): string {
  const root = repoRoot();
  const dir = path.join(os.tmpdir(), `hutch-agent-${PREVIOUS_AGENT_COMMIT}`);
  const bin = path.join(dir, 'agent', 'build', 'hutch-agent');
  if (existsSync(bin)) return bin;
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'hutch-agent-prev-'));
  try {
    const tar = execFileSync('git', ['-C', root, 'archive', PREVIOUS_AGENT_COMMIT, 'agent'], {
      maxBuffer: 64 * 1024 * 1024,
    });
    execFileSync('tar', ['-x', '-C', tmp], { input: tar });
    execFileSync('make', ['-C', path.join(tmp, 'agent'), 'build/hutch-agent'], {
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return bin;
}

/** A temporary directory and a Unix socket path inside it; remove() cleans up. */
export function tempSocketDir(prefix: string): { dir: string; socketPath: string; remove(): void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  return {
    dir,
    socketPath: path.join(dir, 's.sock'),
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/**
 * A Unix socket server that queues the connections it accepts, so a test can take them one
 * at a time (the agent in --connect mode reconnects after every host hang-up).
 */
export class SocketServer {
  readonly server: net.Server;
  private readonly waiting: net.Socket[] = [];
  private readonly takers: Array<(s: net.Socket) => void> = [];
  private readonly all = new Set<net.Socket>();

  private constructor(server: net.Server) {
    this.server = server;
    server.on('connection', (s) => {
      this.all.add(s);
      s.on('close', () => this.all.delete(s));
      s.on('error', () => {});
      const taker = this.takers.shift();
      if (taker) taker(s);
      else this.waiting.push(s);
    });
  }

  static listen(socketPath: string): Promise<SocketServer> {
    return new Promise((resolve, reject) => {
      const server = net.createServer();
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve(new SocketServer(server));
      });
    });
  }

  /** The next accepted connection (queued ones first). */
  accept(timeoutMs: number): Promise<net.Socket> {
    const queued = this.waiting.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const taker = (s: net.Socket): void => {
        clearTimeout(timer);
        resolve(s);
      };
      const timer = setTimeout(() => {
        const i = this.takers.indexOf(taker);
        if (i >= 0) this.takers.splice(i, 1);
        reject(new Error(`no connection within ${timeoutMs} ms`));
      }, timeoutMs);
      this.takers.push(taker);
    });
  }

  close(): Promise<void> {
    for (const s of this.all) s.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** A real hutch-agent in --connect mode, connecting to a socket the test listens on. */
export class AgentProcess {
  readonly child: ChildProcess;
  readonly server: SocketServer;
  private readonly tmp: ReturnType<typeof tempSocketDir>;
  private log = '';

  private constructor(child: ChildProcess, server: SocketServer, tmp: ReturnType<typeof tempSocketDir>) {
    this.child = child;
    this.server = server;
    this.tmp = tmp;
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (d: string) => {
      this.log = (this.log + d).slice(-20000);
    });
  }

  /** `bin`: another agent binary (previousAgentBinary()); default: this tree's. `args`: more flags. */
  static async start(bin = agentBinary(), args: string[] = []): Promise<AgentProcess> {
    const tmp = tempSocketDir('hutch-agent-test-');
    const server = await SocketServer.listen(tmp.socketPath);
    const child = spawn(bin, ['--connect', tmp.socketPath, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    return new AgentProcess(child, server, tmp);
  }

  /** Agent's stderr (last 20 kB), for failure messages. */
  get stderr(): string {
    return this.log;
  }

  /** Takes the agent's next connection and runs the handshake on it. */
  async connect(timeoutMs = 5000): Promise<AgentConnection> {
    const socket = await this.server.accept(timeoutMs);
    return AgentConnection.handshake(socket, { timeoutMs });
  }

  /**
   * Takes the agent's next connection as a raw link: after the handshake the test writes any
   * bytes it likes and reads the agent's frames itself (for requests AgentConnection cannot
   * produce). Close it before connect() is used again.
   */
  async connectRaw(timeoutMs = 5000): Promise<RawAgentLink> {
    return RawAgentLink.handshake(await this.server.accept(timeoutMs), timeoutMs);
  }

  /**
   * Hangs up `conn` (the agent then kills that connection's processes) and waits until the
   * agent has noticed, which it shows by connecting again.
   */
  async hangUp(conn: AgentConnection): Promise<void> {
    conn.close();
    const again = await this.server.accept(5000);
    again.destroy();
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
      this.child.kill('SIGTERM');
      const t = setTimeout(() => this.child.kill('SIGKILL'), 2000);
      await exited;
      clearTimeout(t);
    }
    await this.server.close();
    this.tmp.remove();
  }
}

/** A host end without AgentConnection: raw frames out, decoded frames in. */
export class RawAgentLink {
  private readonly frames: Frame[] = [];
  private readonly decoder = new FrameDecoder();
  private waker: (() => void) | null = null;

  private constructor(readonly socket: net.Socket) {}

  static handshake(socket: net.Socket, timeoutMs: number): Promise<RawAgentLink> {
    const link = new RawAgentLink(socket);
    const nonce = randomBytes(16);
    const scanner = new SequenceScanner(encodeFrame(FrameType.PONG, 0, nonce));
    return new Promise((resolve, reject) => {
      let synced = false;
      const timer = setTimeout(() => reject(new Error('raw link: no PONG')), timeoutMs);
      socket.on('data', (chunk: Buffer) => {
        let bytes: Buffer | null = chunk;
        if (!synced) {
          bytes = scanner.push(chunk);
          if (bytes === null) return;
          synced = true;
          clearTimeout(timer);
          resolve(link);
        }
        link.decoder.feed(bytes, (f) => {
          link.frames.push({ type: f.type, stream: f.stream, payload: Buffer.from(f.payload) });
        });
        link.waker?.();
      });
      socket.write(encodePing(nonce));
    });
  }

  send(...frames: Buffer[]): void {
    this.socket.write(Buffer.concat(frames));
  }

  /** Removes and returns the next frame of `stream` from the agent. */
  async next(stream: number, timeoutMs = 3000): Promise<Frame> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.frames.findIndex((f) => f.stream === stream);
      if (i >= 0) return this.frames.splice(i, 1)[0]!;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`raw link: no frame for stream ${stream}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waker = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waker = null;
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

/**
 * A scripted stand-in for the agent, for hostile-guest tests: it answers the handshake
 * (optionally after stray bytes) and then lets the test read the host's frames and write
 * anything at all.
 */
export class FakeAgent {
  readonly peer: net.Socket;
  readonly conn: AgentConnection;
  private readonly frames: Frame[] = [];
  private readonly takers: Array<() => void> = [];
  private readonly cleanup: () => Promise<void>;

  private constructor(
    peer: net.Socket,
    conn: AgentConnection,
    frames: Frame[],
    cleanup: () => Promise<void>,
  ) {
    this.peer = peer;
    this.conn = conn;
    this.frames = frames;
    this.cleanup = cleanup;
  }

  /**
   * Starts a fake agent and connects to it with connectAgent(). `beforePong` is written
   * just before the PONG, `afterPong` right after it in the same write. With `hello` it
   * answers the host's HELLO like a protocol-2 agent; without, it ignores HELLO like a
   * protocol-1 agent. HELLO frames are not recorded, like PINGs.
   */
  static async start(
    opts: { beforePong?: Buffer; afterPong?: Buffer; hello?: { version: number; features: bigint } } = {},
  ): Promise<FakeAgent> {
    const tmp = tempSocketDir('hutch-fake-agent-');
    const server = await SocketServer.listen(tmp.socketPath);
    const frames: Frame[] = [];
    let notify: () => void = () => {};
    const connP = connectAgent(tmp.socketPath, { timeoutMs: 5000 });
    const peer = await server.accept(5000);
    const decoder = new FrameDecoder();
    let answered = false;
    peer.on('data', (chunk: Buffer) => {
      decoder.feed(chunk, (f) => {
        const frame = { type: f.type, stream: f.stream, payload: Buffer.from(f.payload) };
        if (frame.type === FrameType.HELLO) {
          if (opts.hello) peer.write(encodeHello(opts.hello.version, opts.hello.features));
          return;
        }
        if (frame.type === FrameType.PING) {
          const pong = encodeFrame(FrameType.PONG, 0, frame.payload);
          if (answered) {
            peer.write(pong);
            return;
          }
          answered = true;
          peer.write(
            Buffer.concat([opts.beforePong ?? Buffer.alloc(0), pong, opts.afterPong ?? Buffer.alloc(0)]),
          );
          return;
        }
        frames.push(frame);
        notify();
      });
    });
    const conn = await connP;
    const fake = new FakeAgent(peer, conn, frames, async () => {
      conn.close();
      peer.destroy();
      await server.close();
      tmp.remove();
    });
    notify = () => fake.wake();
    return fake;
  }

  private wake(): void {
    const takers = this.takers.splice(0);
    for (const t of takers) t();
  }

  /** Frames received from the host so far (PINGs excluded), oldest first. */
  get received(): readonly Frame[] {
    return this.frames;
  }

  /** Waits until `pred` holds for the frames received so far. */
  async waitFor(pred: (frames: readonly Frame[]) => boolean, timeoutMs = 3000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred(this.frames)) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('fake agent: condition not met in time');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.takers.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** The next frame of `type` (after those already taken by this method). */
  async next(type: number, timeoutMs = 3000): Promise<Frame> {
    let found: Frame | undefined;
    await this.waitFor((frames) => {
      found = frames.find((f) => f.type === type && !this.taken.has(f));
      return found !== undefined;
    }, timeoutMs);
    this.taken.add(found!);
    return found!;
  }

  private readonly taken = new Set<Frame>();

  send(...frames: Buffer[]): void {
    this.peer.write(Buffer.concat(frames));
  }

  stop(): Promise<void> {
    return this.cleanup();
  }
}
