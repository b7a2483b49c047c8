import { HutchError } from '../errors.js';
import { displayLimits } from '../vmm/machine-spec.js';

/** A machine's screen in pixels. */
export interface ScreenSize {
  width: number;
  height: number;
}

/** What a desktop machine gets unless its create asks for another size (the spec's default). */
export const defaultScreen: ScreenSize = { width: 1024, height: 768 };

/** Sizes that get a snapshot of their own when first asked for; any other size boots cold. */
export const snapshotScreens: ReadonlySet<string> = new Set([
  '1024x768',
  '1280x720',
  '1280x800',
  '1366x768',
  '1440x900',
  '1600x900',
  '1920x1080',
]);

/** `WIDTHxHEIGHT`, as machine rows keep it. */
export function screenText(s: ScreenSize): string {
  return `${s.width}x${s.height}`;
}

/** A row's screen, or undefined for a headless machine. */
export function parseScreen(text: string | null | undefined): ScreenSize | undefined {
  const m = text ? /^(\d+)x(\d+)$/.exec(text) : null;
  return m ? { width: Number(m[1]), height: Number(m[2]) } : undefined;
}

/** Checks a size a client asked for (INVALID_ARGUMENT, naming the limits). */
export function checkScreen(s: ScreenSize): ScreenSize {
  const { minWidth, maxWidth, minHeight, maxHeight } = displayLimits;
  const ok = (v: number, lo: number, hi: number): boolean =>
    Number.isInteger(v) && v >= lo && v <= hi && v % 2 === 0;
  if (!ok(s.width, minWidth, maxWidth) || !ok(s.height, minHeight, maxHeight))
    throw new HutchError(
      'INVALID_ARGUMENT',
      `screen ${s.width}x${s.height}: width and height are even numbers of pixels, ${minWidth}-${maxWidth} by ${minHeight}-${maxHeight}`,
    );
  return s;
}
