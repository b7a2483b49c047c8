/**
 * Who an action is done for. Every engine operation takes one; ownership, quotas and the audit
 * line are decided from it in one place (core/dispatch.ts), never by the transports.
 */
export interface Principal {
  /** The user whose objects this caller sees and makes (the `owner` of machines and boxes). */
  readonly user: string;
  /** How the caller proved who it is: the local admin (loopback or the boxes socket) for now. */
  readonly via: 'local' | 'socket';
  /**
   * Limits of this caller beyond the server-wide caps; absent means none. Checked in the same
   * transaction as the insert (engine/admission.ts).
   */
  readonly quota?: Quota;
}

export interface Quota {
  /** Machines and boxes of this user holding host memory at once. */
  readonly maxActive?: number;
  /** Sum of their guest memory, MiB. */
  readonly maxMemoryMb?: number;
}

/** The local admin user: what every request is today (a loopback listener or the boxes socket). */
export function localPrincipal(user: string, via: Principal['via'] = 'local'): Principal {
  return { user, via };
}
