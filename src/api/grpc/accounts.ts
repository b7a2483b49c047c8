import { required, u64 } from './args.js';
import { type Rpc, unary } from './rpc.js';

/** Identity, tokens and API keys: the Accounts interface (src/auth/), for the caller only. */

/** A lifetime in seconds; its range (and what 0 means) is the accounts side's to check. */
const expiry = (v: string, field: string): number => u64(v, field);

export const accountRpcs: Record<string, Rpc> = {
  Whoami: unary((_req: unknown, cx) => ({
    user_id: cx.app.accounts.whoami(cx.principal).user_id,
    // No SSH server in this version: no fingerprints, not made-up ones.
    pubkey_fingerprints: [],
    default_network_id: cx.act.defaultNetwork(),
  })),
  CreateToken: unary(async (req: { expires_in_secs: string }, cx) => {
    const t = await cx.app.accounts.createToken(cx.principal, expiry(req.expires_in_secs, 'expires_in_secs'));
    return { token: t.token, expires_at: String(t.expires_at) };
  }),
  ListTokens: unary((_req: unknown, cx) => ({
    tokens: cx.app.accounts.listTokens(cx.principal).map((t) => ({
      jti: t.jti,
      created_at: String(t.created_at),
      expires_at: String(t.expires_at),
    })),
  })),
  RevokeToken: unary((req: { jti: string }, cx) => {
    cx.app.accounts.revokeToken(cx.principal, required(req.jti, 'jti'));
    return {};
  }),
  CreateApiKey: unary((req: { name: string; expires_in_secs: string }, cx) => {
    const k = cx.app.accounts.createApiKey(
      cx.principal,
      required(req.name, 'name'),
      expiry(req.expires_in_secs, 'expires_in_secs'),
    );
    return { id: k.id, api_key: k.api_key, expires_at: String(k.expires_at) };
  }),
  ListApiKeys: unary((_req: unknown, cx) => ({
    keys: cx.app.accounts.listApiKeys(cx.principal).map((k) => ({
      id: k.id,
      name: k.name,
      key_prefix: k.key_prefix,
      created_at: String(k.created_at),
      last_used_at: String(k.last_used_at),
      expires_at: String(k.expires_at),
    })),
  })),
  DeleteApiKey: unary((req: { id: string }, cx) => {
    cx.app.accounts.deleteApiKey(cx.principal, required(req.id, 'id'));
    return {};
  }),
};
