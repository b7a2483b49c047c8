import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';
import type { InputAction, InputResult, Screenshot, ScreenshotOptions } from './input-types.js';

/**
 * PLACEHOLDER until the desktop branch is merged (it replaces this file): only the signatures
 * the agents call, so this branch compiles. Every call answers NOT_SERVED.
 */
export class DesktopActions {
  async screenshot(_p: Principal, _id: string, _opts: ScreenshotOptions = {}): Promise<Screenshot> {
    throw new HutchError('NOT_SERVED', 'desktops are not part of this build');
  }

  async input(_p: Principal, _id: string, _actions: InputAction[]): Promise<InputResult> {
    throw new HutchError('NOT_SERVED', 'desktops are not part of this build');
  }
}
