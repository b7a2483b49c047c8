import type { Principal } from '../core/principal.js';

/**
 * How every transport turns a credential into a principal (src/auth/ implements it). A missing,
 * malformed, expired or revoked credential throws HutchError('UNAUTHENTICATED'); it is never
 * treated as anonymous.
 */
export interface Authenticator {
  /** The principal of an `authorization: Bearer <jwt>` header value (the whole header). */
  verifyBearer(authorization: string | undefined): Promise<Principal>;
  /** The principal requests from inside machine `machineId` act as (its owner, `via: 'guest'`). */
  guestPrincipal(owner: string, machineId: string): Principal;
}

/** A user's account operations, for the gRPC Whoami/*Token/*ApiKey RPCs and the CLI. */
export interface Accounts {
  whoami(p: Principal): { user_id: string };
  createToken(
    p: Principal,
    expiresInSecs: number,
  ): Promise<{ token: string; expires_at: number; jti: string }>;
  listTokens(p: Principal): { jti: string; created_at: number; expires_at: number }[];
  revokeToken(p: Principal, jti: string): void;
  createApiKey(
    p: Principal,
    name: string,
    expiresInSecs: number,
  ): { id: string; api_key: string; expires_at: number };
  listApiKeys(p: Principal): {
    id: string;
    name: string;
    key_prefix: string;
    created_at: number;
    last_used_at: number;
    expires_at: number;
  }[];
  deleteApiKey(p: Principal, id: string): void;
}
