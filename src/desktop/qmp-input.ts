import { HutchError } from '../errors.js';
import type { InputAction, MouseButton } from './input-types.js';

/**
 * Input actions as QMP `input-send-event` batches for the display's virtio keyboard and tablet.
 * Key names are xdotool's (X keysyms, case-insensitive, plus the usual aliases), translated to
 * QEMU's QKeyCodes on a US layout: Xorg's default keymap, which is what the guest has.
 */
export type QmpInputEvent =
  | { type: 'abs'; data: { axis: 'x' | 'y'; value: number } }
  | { type: 'btn'; data: { down: boolean; button: string } }
  | { type: 'key'; data: { down: boolean; key: { type: 'qcode'; data: string } } };

/** One step: events sent together, then a pause (ms) before the next step. */
export interface InputStep {
  events: QmpInputEvent[];
  pauseMs: number;
}

/** The tablet's absolute axes run 0…32767 across the screen (QEMU's INPUT_EVENT_ABS_MAX). */
const absMax = 32767;
/**
 * Between key presses: the guest's virtio-input queue holds few events and QEMU drops what does
 * not fit, so typing is paced to what a guest under TCG drains (measured in docs/desktop.md).
 */
const keyPauseMs = 6;
const maxTypeChars = 4096;
const maxActions = 200;
const maxWaitMs = 10_000;

const named: Record<string, string> = {
  return: 'ret',
  enter: 'ret',
  kp_enter: 'kp_enter',
  tab: 'tab',
  iso_left_tab: 'tab',
  escape: 'esc',
  esc: 'esc',
  backspace: 'backspace',
  delete: 'delete',
  del: 'delete',
  insert: 'insert',
  space: 'spc',
  home: 'home',
  end: 'end',
  page_up: 'pgup',
  prior: 'pgup',
  pageup: 'pgup',
  page_down: 'pgdn',
  next: 'pgdn',
  pagedown: 'pgdn',
  up: 'up',
  down: 'down',
  left: 'left',
  right: 'right',
  ctrl: 'ctrl',
  control: 'ctrl',
  control_l: 'ctrl',
  control_r: 'ctrl_r',
  shift: 'shift',
  shift_l: 'shift',
  shift_r: 'shift_r',
  alt: 'alt',
  alt_l: 'alt',
  alt_r: 'alt_r',
  meta: 'meta_l',
  meta_l: 'meta_l',
  meta_r: 'meta_r',
  super: 'meta_l',
  super_l: 'meta_l',
  super_r: 'meta_r',
  win: 'meta_l',
  cmd: 'meta_l',
  caps_lock: 'caps_lock',
  num_lock: 'num_lock',
  scroll_lock: 'scroll_lock',
  print: 'print',
  sys_req: 'sysrq',
  pause: 'pause',
  menu: 'menu',
  minus: 'minus',
  equal: 'equal',
  bracketleft: 'bracket_left',
  bracketright: 'bracket_right',
  backslash: 'backslash',
  semicolon: 'semicolon',
  apostrophe: 'apostrophe',
  grave: 'grave_accent',
  comma: 'comma',
  period: 'dot',
  slash: 'slash',
  kp_add: 'kp_add',
  kp_subtract: 'kp_subtract',
  kp_multiply: 'kp_multiply',
  kp_divide: 'kp_divide',
  kp_decimal: 'kp_decimal',
};
for (let i = 1; i <= 12; i++) named[`f${i}`] = `f${i}`;
for (let i = 0; i <= 9; i++) named[`kp_${i}`] = `kp_${i}`;

/** Printable ASCII on a US keyboard: the key and whether shift is down. */
const unshifted: Record<string, string> = {
  ' ': 'spc',
  '\n': 'ret',
  '\t': 'tab',
  '-': 'minus',
  '=': 'equal',
  '[': 'bracket_left',
  ']': 'bracket_right',
  '\\': 'backslash',
  ';': 'semicolon',
  "'": 'apostrophe',
  '`': 'grave_accent',
  ',': 'comma',
  '.': 'dot',
  '/': 'slash',
};
const shifted: Record<string, string> = {
  '!': '1',
  '@': '2',
  '#': '3',
  $: '4',
  '%': '5',
  '^': '6',
  '&': '7',
  '*': '8',
  '(': '9',
  ')': '0',
  _: 'minus',
  '+': 'equal',
  '{': 'bracket_left',
  '}': 'bracket_right',
  '|': 'backslash',
  ':': 'semicolon',
  '"': 'apostrophe',
  '~': 'grave_accent',
  '<': 'comma',
  '>': 'dot',
  '?': 'slash',
};
/** xdotool also names punctuation by keysym: `plus`, `at`, `exclam`… */
const shiftedNames: Record<string, string> = {
  exclam: '!',
  at: '@',
  numbersign: '#',
  dollar: '$',
  percent: '%',
  asciicircum: '^',
  ampersand: '&',
  asterisk: '*',
  parenleft: '(',
  parenright: ')',
  underscore: '_',
  plus: '+',
  braceleft: '{',
  braceright: '}',
  bar: '|',
  colon: ':',
  quotedbl: '"',
  asciitilde: '~',
  less: '<',
  greater: '>',
  question: '?',
};

/** A character's key on a US layout, or undefined when it has none. */
export function charKey(ch: string): { qcode: string; shift: boolean } | undefined {
  if (/^[a-z0-9]$/.test(ch)) return { qcode: ch, shift: false };
  if (/^[A-Z]$/.test(ch)) return { qcode: ch.toLowerCase(), shift: true };
  const u = unshifted[ch];
  if (u) return { qcode: u, shift: false };
  const s = shifted[ch];
  if (s) return { qcode: s, shift: true };
  return undefined;
}

/** One xdotool key name → the keys to hold (a shifted symbol is shift + its key). */
function keyOf(name: string): string[] {
  const n = name.toLowerCase();
  const direct = named[n];
  if (direct) return [direct];
  const viaChar = shiftedNames[n];
  const ch = viaChar ?? (name.length === 1 ? name : undefined);
  const k = ch !== undefined ? charKey(ch) : undefined;
  if (k) return k.shift ? ['shift', k.qcode] : [k.qcode];
  throw new HutchError(
    'INVALID_ARGUMENT',
    `unknown key ${JSON.stringify(name)} (xdotool names: Return, ctrl, a, F5, …)`,
  );
}

/** `ctrl+shift+t` → the keys of the combination, in press order, each once. */
export function comboKeys(combo: string): string[] {
  const parts = combo.split('+');
  // "ctrl++" means ctrl and plus.
  const names = parts.flatMap((p, i) =>
    p === '' && i === parts.length - 1 && parts.length > 1 ? ['plus'] : p === '' ? [] : [p],
  );
  if (names.length === 0)
    throw new HutchError('INVALID_ARGUMENT', `empty key combination ${JSON.stringify(combo)}`);
  return [...new Set(names.flatMap(keyOf))];
}

/** A pixel's centre on the tablet's axis: the guest maps it back into that same pixel. */
function toAbs(px: number, size: number): number {
  return Math.min(absMax, Math.round(((px + 0.5) * (absMax + 1)) / size));
}

function keyEvent(qcode: string, down: boolean): QmpInputEvent {
  return { type: 'key', data: { down, key: { type: 'qcode', data: qcode } } };
}

function buttonEvent(button: string, down: boolean): QmpInputEvent {
  return { type: 'btn', data: { down, button } };
}

/** Screen size and the pointer before the actions (the host's last position). */
export interface InputContext {
  width: number;
  height: number;
  cursor: { x: number; y: number };
}

/**
 * Checks every action first (INVALID_ARGUMENT, nothing sent) and turns them into steps. The
 * cursor in the context is moved as the actions would move it.
 */
export function inputSteps(actions: unknown, ctx: InputContext): InputStep[] {
  if (!Array.isArray(actions) || actions.length === 0)
    throw new HutchError('INVALID_ARGUMENT', '"actions" must be a non-empty array');
  if (actions.length > maxActions)
    throw new HutchError('INVALID_ARGUMENT', `at most ${maxActions} actions per request`);
  const steps: InputStep[] = [];
  const at = (x: unknown, y: unknown, what: string): QmpInputEvent[] => {
    if (x === undefined && y === undefined) return [];
    if (!Number.isInteger(x) || !Number.isInteger(y))
      throw new HutchError('INVALID_ARGUMENT', `${what}: x and y are integers (pixels)`);
    const px = x as number;
    const py = y as number;
    if (px < 0 || py < 0 || px >= ctx.width || py >= ctx.height)
      throw new HutchError(
        'INVALID_ARGUMENT',
        `${what}: (${px}, ${py}) is off the ${ctx.width}x${ctx.height} screen`,
      );
    ctx.cursor = { x: px, y: py };
    return [
      {
        type: 'abs',
        data: { axis: 'x', value: toAbs(px, ctx.width) },
      },
      {
        type: 'abs',
        data: { axis: 'y', value: toAbs(py, ctx.height) },
      },
    ];
  };
  const buttonOf = (b: unknown, what: string): MouseButton => {
    if (b === undefined) return 'left';
    if (b === 'left' || b === 'right' || b === 'middle') return b;
    throw new HutchError('INVALID_ARGUMENT', `${what}: button is left, right or middle`);
  };
  for (const [i, raw] of actions.entries()) {
    const a = raw as InputAction & Record<string, unknown>;
    const what = `actions[${i}] (${String(a?.type)})`;
    if (!a || typeof a !== 'object') throw new HutchError('INVALID_ARGUMENT', `actions[${i}]: an object`);
    switch (a.type) {
      case 'move': {
        if (a.x === undefined || a.y === undefined)
          throw new HutchError('INVALID_ARGUMENT', `${what}: x and y`);
        steps.push({ events: at(a.x, a.y, what), pauseMs: 0 });
        break;
      }
      case 'click': {
        const button = buttonOf(a.button, what);
        const count = a.count ?? 1;
        if (!Number.isInteger(count) || count < 1 || count > 3)
          throw new HutchError('INVALID_ARGUMENT', `${what}: count is 1, 2 or 3`);
        const move = at(a.x, a.y, what);
        if (move.length) steps.push({ events: move, pauseMs: 0 });
        for (let c = 0; c < count; c++) {
          steps.push({ events: [buttonEvent(button, true)], pauseMs: 0 });
          steps.push({ events: [buttonEvent(button, false)], pauseMs: count > 1 ? 30 : 0 });
        }
        break;
      }
      case 'down':
      case 'up': {
        const button = buttonOf(a.button, what);
        const move = at(a.x, a.y, what);
        steps.push({ events: [...move, buttonEvent(button, a.type === 'down')], pauseMs: 0 });
        break;
      }
      case 'scroll': {
        const dirs = {
          up: 'wheel-up',
          down: 'wheel-down',
          left: 'wheel-left',
          right: 'wheel-right',
        } as const;
        const wheel = dirs[a.direction as keyof typeof dirs];
        if (!wheel) throw new HutchError('INVALID_ARGUMENT', `${what}: direction is up, down, left or right`);
        const amount = a.amount ?? 3;
        if (!Number.isInteger(amount) || amount < 1 || amount > 50)
          throw new HutchError('INVALID_ARGUMENT', `${what}: amount is 1-50 notches`);
        const move = at(a.x, a.y, what);
        if (move.length) steps.push({ events: move, pauseMs: 0 });
        for (let n = 0; n < amount; n++)
          steps.push({ events: [buttonEvent(wheel, true), buttonEvent(wheel, false)], pauseMs: keyPauseMs });
        break;
      }
      case 'key':
      case 'key_down':
      case 'key_up': {
        if (typeof a.keys !== 'string' || a.keys.trim() === '' || a.keys.length > 256)
          throw new HutchError('INVALID_ARGUMENT', `${what}: keys is 1-256 characters of xdotool key names`);
        for (const combo of a.keys.trim().split(/\s+/)) {
          const keys = comboKeys(combo);
          if (a.type !== 'key_up') steps.push({ events: keys.map((k) => keyEvent(k, true)), pauseMs: 0 });
          if (a.type !== 'key_down')
            steps.push({ events: [...keys].reverse().map((k) => keyEvent(k, false)), pauseMs: keyPauseMs });
        }
        break;
      }
      case 'type': {
        if (typeof a.text !== 'string' || a.text.length === 0 || a.text.length > maxTypeChars)
          throw new HutchError('INVALID_ARGUMENT', `${what}: text is 1-${maxTypeChars} characters`);
        for (const ch of a.text) {
          const k = charKey(ch);
          if (!k)
            throw new HutchError(
              'INVALID_ARGUMENT',
              `${what}: ${JSON.stringify(ch)} cannot be typed (printable ASCII, tab and newline only)`,
            );
          const keys = k.shift ? ['shift', k.qcode] : [k.qcode];
          steps.push({ events: keys.map((q) => keyEvent(q, true)), pauseMs: 0 });
          steps.push({ events: [...keys].reverse().map((q) => keyEvent(q, false)), pauseMs: keyPauseMs });
        }
        break;
      }
      case 'wait': {
        if (!Number.isInteger(a.ms) || (a.ms as number) < 0 || (a.ms as number) > maxWaitMs)
          throw new HutchError('INVALID_ARGUMENT', `${what}: ms is 0-${maxWaitMs}`);
        steps.push({ events: [], pauseMs: a.ms as number });
        break;
      }
      default:
        throw new HutchError(
          'INVALID_ARGUMENT',
          `${what}: type is one of move, click, down, up, scroll, key, key_down, key_up, type, wait`,
        );
    }
  }
  return steps;
}
