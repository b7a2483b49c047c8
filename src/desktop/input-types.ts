/**
 * Input a client (or the computer-use agent) sends to a machine's screen, performed by the host
 * over QMP (`input-send-event`), never by anything in the guest. Coordinates are screen pixels
 * (0,0 top left); key names are xdotool's (`Return`, `ctrl+s`, `shift+Tab`, `a`), a space
 * separates keys pressed one after another (`ctrl+a Delete`).
 */
export type MouseButton = 'left' | 'right' | 'middle';

export type InputAction =
  /** Moves the pointer. */
  | { type: 'move'; x: number; y: number }
  /** Clicks `count` times (1–3) with `button` (default left), first moving to x,y when given. */
  | { type: 'click'; x?: number; y?: number; button?: MouseButton; count?: number }
  /** Presses (`down`) or releases (`up`) a button, at x,y when given: drags are down, move, up. */
  | { type: 'down' | 'up'; x?: number; y?: number; button?: MouseButton }
  /** Scrolls `amount` notches (default 3), at x,y when given. */
  | { type: 'scroll'; x?: number; y?: number; direction: 'up' | 'down' | 'left' | 'right'; amount?: number }
  /** Presses and releases each key combination in turn. */
  | { type: 'key'; keys: string }
  /** Presses (`key_down`) or releases (`key_up`) a key combination: holding a key is down, wait, up. */
  | { type: 'key_down' | 'key_up'; keys: string }
  /** Types text as key presses (ASCII printable, tab and newline; anything else is refused). */
  | { type: 'type'; text: string }
  /** Waits, between other actions (at most 10 s). */
  | { type: 'wait'; ms: number };

/** What input answers: where the pointer is after the actions, as far as the host moved it. */
export interface InputResult {
  cursor: { x: number; y: number };
}

/** A screenshot: a PNG, its size, and the screen's (they differ when it was scaled down). */
export interface Screenshot {
  png: Buffer;
  width: number;
  height: number;
  screen: { width: number; height: number };
}

/**
 * How a screenshot is wanted: scaled by `scale` (0 < s ≤ 1) or to at most `maxWidth` pixels
 * wide; `region` (screen pixels) crops first, for a close look at part of the screen.
 */
export interface ScreenshotOptions {
  scale?: number;
  maxWidth?: number;
  region?: { x: number; y: number; width: number; height: number };
}
