/**
 * Who an action is done for. Every engine operation takes one; ownership, quotas and the audit
 * line are decided from it in one place (core/dispatch.ts), never by the transports.
 */
export interface Principal {
  /** The user whose objects this caller sees and makes (the `owner` of machines and boxes). */
  readonly user: string;
  /**
   * How the caller proved who it is: `local` (a loopback REST request without a token, as the
   * local admin), `socket` (the boxes Unix socket: its file permissions), `token` (a JWT from an
   * API key), `guest` (a request from inside one of the user's machines, over its agent channel).
   */
  readonly via: 'local' | 'socket' | 'token' | 'guest';
  /** The token's id when `via` is `token`: what revocation and the audit line name. */
  readonly jti?: string;
  /** The machine a `guest` request came from. */
  readonly machine?: string;
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
  /** Sum of their vCPUs. */
  readonly maxVcpus?: number;
}

/** The local admin user: a loopback request without a token, or the boxes socket. */
export function localPrincipal(user: string, via: Principal['via'] = 'local'): Principal {
  return { user, via };
}
