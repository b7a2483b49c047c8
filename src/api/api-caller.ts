import type { AuthService } from '../auth/auth-service.js';
import type { Actions } from '../core/dispatch.js';
import { actionTable } from '../core/dispatch.js';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';

/** How an HTTP API learns who its callers are (built once by the daemon). */
export interface ApiCaller {
  auth: AuthService;
  /** Whom a request without a token acts as on this listener; absent: a token is required. */
  anonymous?: (() => Principal) | undefined;
  /** What a public route's handler gets as actions: every one refuses. */
  nobody: Actions;
}

/** Actions for nobody: a public route that reached for one is a bug, answered as unauthenticated. */
export function noActions(): Actions {
  const out: Record<string, unknown> = {};
  for (const name of Object.keys(actionTable))
    out[name] = () => {
      throw new HutchError('UNAUTHENTICATED', 'this request needs credentials');
    };
  return out as Actions;
}
