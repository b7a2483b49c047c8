import { EventEmitter } from 'node:events';
import { closeSync, openSync, renameSync, writeSync } from 'node:fs';
import { connect, type Socket } from 'node:net';

/** Recent output is kept in blocks of this size. */
const ringBlock = 16 * 1024;

/**
 * The guest's serial console: kept in a ring buffer (recent output, replayed to new viewers and
 * quoted in boot errors) and in a log file that rotates at a fixed size, so a guest that floods
 * its console costs the host a bounded amount of memory and disk.
 */
export class ConsoleTap extends EventEmitter {
  /** Blocks of `ringBlock` bytes, all full but the last (filled up to `ringTail`). */
  private ring: Buffer[] = [];
  private ringTail = 0;
  private ringBytes = 0;
  private sock: Socket | undefined;
  private logFd: number | undefined;
  private logBytes = 0;
  private stopped = false;
  /** Console bytes the log file could not take (a full disk); the ring still had them. */
  droppedLogBytes = 0;
  /** Settles when the console socket has drained, while it holds more than its high-water mark. */
  private drained: Promise<void> | undefined;

  constructor(
    private readonly socketPath: string,
    private readonly logPath: string,
    private readonly ringLimit = 256 * 1024,
    private readonly logLimit = 4 * 1024 * 1024,
  ) {
    super();
  }

  start(): void {
    this.connectLoop();
  }

  private connectLoop(): void {
    if (this.stopped) return;
    const s = connect(this.socketPath);
    s.on('connect', () => {
      this.sock = s;
    });
    s.on('data', (b: Buffer) => this.onData(b));
    s.on('error', () => {
      // QEMU not listening yet, or gone: the close handler retries while we are wanted
    });
    s.on('close', () => {
      this.sock = undefined;
      if (!this.stopped) setTimeout(() => this.connectLoop(), 50).unref();
    });
  }

  private onData(b: Buffer): void {
    this.remember(b);
    this.writeLog(b);
    this.emit('data', b);
  }

  /**
   * Appends to the log file, rotating at its limit. A write the host's disk refuses (ENOSPC)
   * drops those bytes from the file only: the ring and live viewers still get them, and the
   * daemon carries on (this runs in a socket callback, where a throw would take it down).
   */
  private writeLog(b: Buffer): void {
    if (this.stopped) return;
    try {
      // What a guest prints is its user's business: owner-only, like every state file.
      if (this.logFd === undefined) this.logFd = openSync(this.logPath, 'a', 0o600);
      if (this.logBytes + b.length > this.logLimit) {
        closeSync(this.logFd);
        this.logFd = undefined;
        renameSync(this.logPath, `${this.logPath}.1`);
        this.logFd = openSync(this.logPath, 'w', 0o600);
        this.logBytes = 0;
      }
      writeSync(this.logFd, b);
      this.logBytes += b.length;
    } catch {
      this.droppedLogBytes += b.length;
    }
  }

  /**
   * Keeps the output in the ring, copied into blocks: a guest printing a byte at a time comes in
   * reads of a byte or two, and kept as they came each would cost a few hundred bytes of Buffer
   * (256 KiB of recent output held as ~70 MiB).
   */
  private remember(b: Buffer): void {
    for (let off = 0; off < b.length; ) {
      let last = this.ring[this.ring.length - 1];
      if (!last || this.ringTail === last.length) {
        last = Buffer.allocUnsafe(ringBlock);
        this.ring.push(last);
        this.ringTail = 0;
      }
      const n = b.copy(last, this.ringTail, off);
      this.ringTail += n;
      this.ringBytes += n;
      off += n;
    }
    // Drop whole blocks from the front while what stays is still at least the limit.
    while (this.ring.length > 1 && this.ringBytes - ringBlock >= this.ringLimit) {
      this.ring.shift();
      this.ringBytes -= ringBlock;
    }
  }

  /** Recent console output (at most the ring's size). */
  recent(): Buffer {
    const parts = this.ring.map((blk, i) =>
      i === this.ring.length - 1 ? blk.subarray(0, this.ringTail) : blk,
    );
    const all = Buffer.concat(parts);
    return all.length > this.ringLimit ? all.subarray(all.length - this.ringLimit) : all;
  }

  /**
   * Bytes to the guest's serial port (keyboard input of the console). Resolves at once while the
   * socket takes them, else once it has drained: QEMU reads only as fast as the guest's UART, so
   * writers that wait for this hold the rest (several viewers may type at once). Without a
   * connection the bytes are lost, as keys typed on an unplugged serial line are.
   */
  write(b: Buffer | string): Promise<void> {
    const s = this.sock;
    if (!s || s.destroyed) return Promise.resolve();
    if (s.write(b)) return Promise.resolve();
    if (!this.drained) {
      // One wait for every writer, not a listener pair each.
      this.drained = new Promise<void>((resolve) => {
        const done = (): void => {
          s.off('drain', done);
          s.off('close', done);
          this.drained = undefined;
          resolve();
        };
        s.on('drain', done);
        s.on('close', done);
      });
    }
    return this.drained;
  }

  /** Stops the tap; emits 'stop' once, so live viewers can be told the console is gone. */
  stop(): void {
    if (!this.stopped) setImmediate(() => this.emit('stop'));
    this.stopped = true;
    this.sock?.destroy();
    if (this.logFd !== undefined) {
      closeSync(this.logFd);
      this.logFd = undefined;
    }
  }
}
