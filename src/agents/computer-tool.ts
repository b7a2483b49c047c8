import type { InputAction, MouseButton, Screenshot } from '../desktop/input-types.js';

/**
 * The computer-use tool (Anthropic's `computer_*`): its versions, and the translation of the
 * model's actions into the desktop's host-side input. The model sees the screen scaled to fit
 * what it handles well (`fitScale`); every coordinate it sends is in that scaled space and is
 * scaled back to the real screen here, so a click lands where the model saw the pixel.
 */

/** Tool version → the beta header that enables it. */
export const computerToolVersions = {
  computer_20250124: 'computer-use-2025-01-24',
  computer_20251124: 'computer-use-2025-11-24',
} as const;

export type ComputerToolVersion = keyof typeof computerToolVersions;

export function isComputerToolVersion(v: string): v is ComputerToolVersion {
  return Object.hasOwn(computerToolVersions, v);
}

/** The largest image the model is shown (what the reference implementation scales to). */
export const maxModelImage = { width: 1280, height: 800 } as const;

/** The scale (0 < s ≤ 1) that fits a screen into `maxModelImage`, never enlarging. */
export function fitScale(screen: { width: number; height: number }): number {
  return Math.min(1, maxModelImage.width / screen.width, maxModelImage.height / screen.height);
}

/** The screen as the model sees it, and the real one. */
export interface ScreenGeometry {
  /** What the model sees (display_width_px/height_px). */
  width: number;
  height: number;
  screen: { width: number; height: number };
}

export function geometryOf(shot: Pick<Screenshot, 'width' | 'height' | 'screen'>): ScreenGeometry {
  return { width: shot.width, height: shot.height, screen: { ...shot.screen } };
}

/** A tool input the model got wrong: becomes an `is_error` result the model can correct. */
export class ToolInputError extends Error {}

/** A model point → a real screen point; outside the screen (or not two integers) is refused. */
export function toScreen(g: ScreenGeometry, value: unknown, field = 'coordinate'): { x: number; y: number } {
  if (
    !Array.isArray(value) ||
    value.length !== 2 ||
    !value.every((n) => typeof n === 'number' && Number.isFinite(n))
  )
    throw new ToolInputError(`${field} must be [x, y], two numbers`);
  const [x, y] = value as [number, number];
  if (x < 0 || y < 0 || x >= g.width || y >= g.height)
    throw new ToolInputError(
      `${field} [${x}, ${y}] is outside the screen (0..${g.width - 1}, 0..${g.height - 1})`,
    );
  return {
    x: Math.min(g.screen.width - 1, Math.round((x * g.screen.width) / g.width)),
    y: Math.min(g.screen.height - 1, Math.round((y * g.screen.height) / g.height)),
  };
}

/** A real screen point → the model's space (cursor_position). */
export function toModel(g: ScreenGeometry, p: { x: number; y: number }): { x: number; y: number } {
  return {
    x: Math.round((p.x * g.width) / g.screen.width),
    y: Math.round((p.y * g.height) / g.screen.height),
  };
}

/** Most characters one `type` action may send (a model pasting a novel is a mistake). */
export const maxTypeChars = 4096;
/** Longest `wait` or `hold_key`, seconds. */
export const maxWaitSeconds = 60;

/**
 * What one computer action does: input to send, or something the loop does itself. `wait` is
 * the loop's (an input wait holds at most 10 s, and a wait must end when the client stops).
 */
export type ComputerPlan =
  | { kind: 'input'; actions: InputAction[] }
  | { kind: 'screenshot' }
  /** A close look at `region` (screen pixels). */
  | { kind: 'zoom'; region: { x: number; y: number; width: number; height: number } }
  | { kind: 'cursor_position' }
  | { kind: 'wait'; ms: number };

function obj(input: unknown): Record<string, unknown> {
  if (input === null || typeof input !== 'object' || Array.isArray(input))
    throw new ToolInputError('the input must be an object');
  return input as Record<string, unknown>;
}

function str(o: Record<string, unknown>, field: string, max = maxTypeChars): string {
  const v = o[field];
  if (typeof v !== 'string' || v === '') throw new ToolInputError(`${field} must be a non-empty string`);
  if (v.length > max) throw new ToolInputError(`${field} is longer than ${max} characters`);
  return v;
}

function seconds(o: Record<string, unknown>, field: string): number {
  const v = o[field];
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > maxWaitSeconds)
    throw new ToolInputError(`${field} must be a number of seconds, 0..${maxWaitSeconds}`);
  return v;
}

/** The optional point of a click or scroll: none means where the pointer is. */
function at(g: ScreenGeometry, o: Record<string, unknown>): { x?: number; y?: number } {
  return o.coordinate === undefined || o.coordinate === null ? {} : toScreen(g, o.coordinate);
}

/** Modifier keys held around a click or scroll (`text`: "shift", "ctrl+alt"). */
function withModifiers(o: Record<string, unknown>, inner: InputAction[]): InputAction[] {
  if (o.text === undefined || o.text === null) return inner;
  const keys = str(o, 'text', 100);
  if (/\s/.test(keys)) throw new ToolInputError('text (modifier keys) must be one combination, e.g. "shift"');
  return [{ type: 'key_down', keys }, ...inner, { type: 'key_up', keys }];
}

const clicks: Record<string, { button: MouseButton; count: number }> = {
  left_click: { button: 'left', count: 1 },
  right_click: { button: 'right', count: 1 },
  middle_click: { button: 'middle', count: 1 },
  double_click: { button: 'left', count: 2 },
  triple_click: { button: 'left', count: 3 },
};

/** Plans one computer action; ToolInputError for anything the model got wrong. */
export function planComputerAction(
  version: ComputerToolVersion,
  g: ScreenGeometry,
  rawInput: unknown,
): ComputerPlan {
  const o = obj(rawInput);
  const action = o.action;
  if (typeof action !== 'string') throw new ToolInputError('action must be a string');
  const click = clicks[action];
  if (click) {
    const p = at(g, o);
    return {
      kind: 'input',
      actions: withModifiers(o, [{ type: 'click', ...p, button: click.button, count: click.count }]),
    };
  }
  switch (action) {
    case 'screenshot':
      return { kind: 'screenshot' };
    case 'cursor_position':
      return { kind: 'cursor_position' };
    case 'key':
      return { kind: 'input', actions: [{ type: 'key', keys: str(o, 'text', 1000) }] };
    case 'hold_key': {
      const keys = str(o, 'text', 100);
      const ms = Math.round(seconds(o, 'duration') * 1000);
      const waits: InputAction[] = [];
      // An input wait is at most 10 s: a longer hold is several.
      for (let left = ms; left > 0; left -= 10_000) waits.push({ type: 'wait', ms: Math.min(left, 10_000) });
      return { kind: 'input', actions: [{ type: 'key_down', keys }, ...waits, { type: 'key_up', keys }] };
    }
    case 'type':
      return { kind: 'input', actions: [{ type: 'type', text: str(o, 'text') }] };
    case 'mouse_move':
      return { kind: 'input', actions: [{ type: 'move', ...toScreen(g, o.coordinate) }] };
    case 'left_mouse_down':
    case 'left_mouse_up':
      return {
        kind: 'input',
        actions: [{ type: action === 'left_mouse_down' ? 'down' : 'up', ...at(g, o), button: 'left' }],
      };
    case 'left_click_drag': {
      const from = toScreen(g, o.start_coordinate, 'start_coordinate');
      const to = toScreen(g, o.coordinate);
      return {
        kind: 'input',
        actions: [
          { type: 'down', ...from, button: 'left' },
          { type: 'move', ...to },
          { type: 'up', ...to, button: 'left' },
        ],
      };
    }
    case 'scroll': {
      const direction = o.scroll_direction;
      if (direction !== 'up' && direction !== 'down' && direction !== 'left' && direction !== 'right')
        throw new ToolInputError('scroll_direction must be up, down, left or right');
      const amount = o.scroll_amount ?? 3;
      if (typeof amount !== 'number' || !Number.isInteger(amount) || amount < 0 || amount > 100)
        throw new ToolInputError('scroll_amount must be an integer, 0..100');
      return {
        kind: 'input',
        actions: withModifiers(o, [{ type: 'scroll', ...at(g, o), direction, amount }]),
      };
    }
    case 'wait':
      return { kind: 'wait', ms: Math.round(seconds(o, 'duration') * 1000) };
    case 'zoom': {
      if (version !== 'computer_20251124')
        throw new ToolInputError(`zoom needs computer_20251124, not ${version}`);
      const r = o.region;
      if (!Array.isArray(r) || r.length !== 4 || !r.every((n) => typeof n === 'number' && Number.isFinite(n)))
        throw new ToolInputError('region must be [x1, y1, x2, y2]');
      const a = toScreen(g, [r[0], r[1]], 'region');
      const b = toScreen(g, [Math.max(0, (r[2] as number) - 1), Math.max(0, (r[3] as number) - 1)], 'region');
      if (b.x < a.x || b.y < a.y)
        throw new ToolInputError('region must be [x1, y1, x2, y2] with x1 ≤ x2, y1 ≤ y2');
      return { kind: 'zoom', region: { x: a.x, y: a.y, width: b.x - a.x + 1, height: b.y - a.y + 1 } };
    }
    default:
      throw new ToolInputError(`unknown action ${JSON.stringify(action).slice(0, 80)}`);
  }
}
