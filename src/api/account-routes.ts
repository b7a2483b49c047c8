import { z } from 'zod';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';
import { type ApiRoute, routesOf } from './http/routes.js';
import type { MachinesApp } from './machine-channels.js';
import {
  apiKeyInfoSchema,
  createApiKeyBody,
  createdApiKeySchema,
  createTokenBody,
  tokenBody,
  tokenInfoSchema,
  tokenSchema,
  whoamiSchema,
} from './schemas.js';

const route = routesOf<MachinesApp>();

/** The caller of an authenticated route (never null there: only public routes get null). */
function caller(me: Principal | null): Principal {
  if (!me) throw new HutchError('UNAUTHENTICATED', 'this request needs credentials');
  return me;
}

const idParam = (name: string, v: string | undefined): string => {
  if (!v || v.length > 128) throw new HutchError('INVALID_ARGUMENT', `invalid ${name}`);
  return v;
};

/**
 * Accounts on REST, the same operations as gRPC's Whoami/*Token/*ApiKey (src/auth/). Keys and
 * tokens can't be made, listed or revoked from inside a machine (PERMISSION_DENIED): its
 * identity must not leave it.
 */
export const accountRoutes: ApiRoute<MachinesApp>[] = [
  route.json({
    method: 'POST',
    path: '/api/v1/auth/token',
    summary: 'Exchange an API key for a short-lived JWT (rate-limited per source address)',
    description:
      'Send the JWT as `authorization: Bearer <token>` on every REST request, WebSocket and gRPC call. A revoked token, or one whose API key was deleted, stops working at once.',
    body: tokenBody,
    response: tokenSchema,
    status: 200,
    public: true,
    handle: ({ auth, body, req }) => auth.exchange(body.api_key, req.socket.remoteAddress ?? 'tunnel'),
  }),
  route.json({
    method: 'GET',
    path: '/v1/whoami',
    summary: 'The user this request acts for, and how it was authenticated',
    response: whoamiSchema,
    status: 200,
    handle: ({ act }) => act.whoami(),
  }),
  route.json({
    method: 'GET',
    path: '/api/v1/tokens',
    summary: 'Your tokens that still work (not expired, not revoked)',
    response: z.object({ tokens: z.array(tokenInfoSchema) }),
    status: 200,
    handle: ({ auth, me }) => ({ tokens: auth.listTokens(caller(me)) }),
  }),
  route.json({
    method: 'POST',
    path: '/api/v1/tokens',
    summary: 'A new token for yourself (at most HUTCH_MAX_TOKEN_TTL_SECONDS)',
    body: createTokenBody,
    response: tokenSchema.omit({ user_id: true }).extend({ jti: z.string() }),
    status: 201,
    handle: ({ auth, me, body }) => auth.createToken(caller(me), body.expires_in_secs),
  }),
  route.json({
    method: 'DELETE',
    path: '/api/v1/tokens/{jti}',
    summary: 'Revoke a token: it stops working at once, on every API',
    status: 204,
    handle: ({ auth, me, params }) => auth.revokeToken(caller(me), idParam('jti', params.jti)),
  }),
  route.json({
    method: 'GET',
    path: '/api/v1/api-keys',
    summary: 'Your API keys (prefixes only: keys are stored as hashes)',
    response: z.object({ keys: z.array(apiKeyInfoSchema) }),
    status: 200,
    handle: ({ auth, me }) => ({ keys: auth.listApiKeys(caller(me)) }),
  }),
  route.json({
    method: 'POST',
    path: '/api/v1/api-keys',
    summary: 'A new API key, shown once',
    body: createApiKeyBody,
    response: createdApiKeySchema,
    status: 201,
    handle: ({ auth, me, body }) => auth.createApiKey(caller(me), body.name, body.expires_in_secs),
  }),
  route.json({
    method: 'DELETE',
    path: '/api/v1/api-keys/{id}',
    summary: 'Delete an API key; every token exchanged for it is revoked at once',
    status: 204,
    handle: ({ auth, me, params }) => auth.deleteApiKey(caller(me), idParam('id', params.id)),
  }),
];
