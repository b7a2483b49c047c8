import { EventEmitter } from 'node:events';
import { closeSync, openSync, renameSync, writeSync } from 'node:fs';
import { connect, type Socket } from 'node:net';

/**
 * The guest's serial console: kept in a ring buffer (recent output, replayed to new viewers and
 * quoted in boot errors) and in a log file that rotates at a fixed size, so a guest that floods
 * its console costs the host a bounded amount of memory and disk.
 */
export class ConsoleTap extends EventEmitter {
  private ring: Buffer[] = [];
  private ringBytes = 0;
  private sock: Socket | undefined;
  private logFd: number | undefined;
  private logBytes = 0;
  private stopped = false;
  /** Console bytes the log file could not take (a full disk); the ring still had them. */
  droppedLogBytes = 0;

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
    this.ring.push(b);
    this.ringBytes += b.length;
    while (this.ringBytes > this.ringLimit && this.ring.length > 1) {
      this.ringBytes -= this.ring.shift()?.length ?? 0;
    }
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

  /** Recent console output (at most the ring's size). */
  recent(): Buffer {
    return Buffer.concat(this.ring);
  }

  /** Bytes to the guest's serial port (keyboard input of the console). */
  write(b: Buffer | string): void {
    this.sock?.write(b);
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
