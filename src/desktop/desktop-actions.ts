import { randomBytes } from 'node:crypto';
import { readFile, unlink } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Principal } from '../core/principal.js';
import type { Machine } from '../engine/machine.js';
import type { MachineRow } from '../engine/store.js';
import { HutchError } from '../errors.js';
import type { Qmp } from '../vmm/hypervisor.js';
import { runPaths } from '../vmm/qemu.js';
import type { InputAction, InputResult, Screenshot, ScreenshotOptions } from './input-types.js';
import { crop, encodePng, parsePpm, pngSize, scaleDown } from './png.js';
import { inputSteps } from './qmp-input.js';
import { parseScreen, type ScreenSize } from './screen-size.js';

/** A machine held for a desktop operation: running (a suspended one is woken), in use until released. */
export interface HeldMachine {
  m: Machine;
  row: MachineRow;
  release: () => void;
}

export interface DesktopDeps {
  /** The caller's machine, running or paused, held in use; MACHINE_NOT_FOUND / _NOT_RUNNING. */
  hold: (p: Principal, idOrName: string) => Promise<HeldMachine>;
  qmpOf: (m: Machine) => Promise<Qmp>;
}

/**
 * The screen of a desktop machine, from the host side: screenshots (QMP screendump), input
 * (QMP input-send-event to the virtio keyboard and tablet) and VNC (QEMU's server on the
 * machine's Unix socket). Nothing here relies on a process in the guest.
 */
export class DesktopActions {
  /** Where the host last put each machine's pointer, and the screen size it last saw. */
  private readonly pointer = new WeakMap<Machine, { x: number; y: number }>();
  private readonly sizes = new WeakMap<Machine, ScreenSize>();
  /** One input request at a time per machine: interleaved key presses would garble both. */
  private readonly inputQueue = new WeakMap<Machine, Promise<unknown>>();

  constructor(private readonly d: DesktopDeps) {}

  private async held(p: Principal, idOrName: string): Promise<HeldMachine & { screen: ScreenSize }> {
    const h = await this.d.hold(p, idOrName);
    const screen = parseScreen(h.row.display);
    if (!screen) {
      h.release();
      throw new HutchError(
        'NO_DISPLAY',
        `machine ${h.row.id} has no display (template ${h.row.template}); desktops are {"template":"desktop"}`,
      );
    }
    return { ...h, screen: this.sizes.get(h.m) ?? screen };
  }

  async screenshot(p: Principal, idOrName: string, opts: ScreenshotOptions = {}): Promise<Screenshot> {
    if (opts.scale !== undefined && !(opts.scale > 0 && opts.scale <= 1))
      throw new HutchError('INVALID_ARGUMENT', 'scale: a number above 0, at most 1');
    if (opts.maxWidth !== undefined && !(Number.isInteger(opts.maxWidth) && opts.maxWidth >= 16))
      throw new HutchError('INVALID_ARGUMENT', 'max_width: an integer of at least 16 pixels');
    const r = opts.region;
    if (
      r &&
      !(
        [r.x, r.y, r.width, r.height].every((v) => Number.isInteger(v)) &&
        r.x >= 0 &&
        r.y >= 0 &&
        r.width >= 1 &&
        r.height >= 1
      )
    )
      throw new HutchError('INVALID_ARGUMENT', 'region: x, y ≥ 0 and width, height ≥ 1, in whole pixels');
    const h = await this.held(p, idOrName);
    try {
      const qmp = await this.d.qmpOf(h.m);
      const scaled =
        r !== undefined ||
        (opts.scale !== undefined && opts.scale < 1) ||
        (opts.maxWidth ?? Infinity) < h.screen.width;
      // Unscaled: QEMU's own PNG. Scaled: raw pixels, averaged down and encoded here.
      const format = scaled ? 'ppm' : 'png';
      // The jailed QEMU user writes only where it may: its migration directory.
      const file = join(runPaths(h.row.run_dir).migDir, `screen-${randomBytes(6).toString('hex')}.${format}`);
      let data: Buffer;
      try {
        await qmp.execute('screendump', { filename: file, format });
        data = await readFile(file);
      } finally {
        await unlink(file).catch(() => {});
      }
      if (!scaled) {
        const size = pngSize(data);
        this.sizes.set(h.m, size);
        return { png: data, ...size, screen: size };
      }
      const whole = parsePpm(data);
      const screen = { width: whole.width, height: whole.height };
      this.sizes.set(h.m, screen);
      if (r && (r.x + r.width > screen.width || r.y + r.height > screen.height))
        throw new HutchError(
          'INVALID_ARGUMENT',
          `region ${r.width}x${r.height} at (${r.x}, ${r.y}) is not within the ${screen.width}x${screen.height} screen`,
        );
      const img = r ? crop(whole, r) : whole;
      const factor = Math.min(opts.scale ?? 1, (opts.maxWidth ?? Infinity) / img.width);
      const width = Math.max(1, Math.round(img.width * factor));
      const height = Math.max(1, Math.round(img.height * factor));
      return { png: encodePng(scaleDown(img, width, height)), width, height, screen };
    } finally {
      h.release();
    }
  }

  /** Performs the actions in order (all checked before any is sent); answers where the pointer is. */
  async input(p: Principal, idOrName: string, actions: InputAction[]): Promise<InputResult> {
    const h = await this.held(p, idOrName);
    try {
      const cursor = this.pointer.get(h.m) ?? {
        x: Math.floor(h.screen.width / 2),
        y: Math.floor(h.screen.height / 2),
      };
      const ctx = { ...h.screen, cursor };
      const steps = inputSteps(actions, ctx);
      const run = async (): Promise<void> => {
        const qmp = await this.d.qmpOf(h.m);
        for (const step of steps) {
          if (step.events.length) await qmp.execute('input-send-event', { events: step.events });
          if (step.pauseMs) await new Promise((r) => setTimeout(r, step.pauseMs));
        }
      };
      const prev = this.inputQueue.get(h.m) ?? Promise.resolve();
      const mine = prev.catch(() => {}).then(run);
      this.inputQueue.set(h.m, mine);
      await mine;
      this.pointer.set(h.m, ctx.cursor);
      return { cursor: ctx.cursor };
    } finally {
      h.release();
    }
  }

  /**
   * A connection to the machine's VNC server (RFB), for the daemon's WebSocket bridge: the
   * machine is in use while it is open.
   */
  async openVnc(p: Principal, idOrName: string): Promise<Duplex> {
    const h = await this.held(p, idOrName);
    const sock = createConnection(runPaths(h.row.run_dir).vnc);
    sock.once('close', h.release);
    try {
      await new Promise<void>((resolve, reject) => {
        sock.once('connect', resolve);
        sock.once('error', reject);
      });
    } catch (e) {
      sock.destroy();
      throw new HutchError(
        'AGENT_UNAVAILABLE',
        `machine ${h.row.id}'s screen is not answering: ${(e as Error).message}`,
      );
    }
    return sock;
  }
}
