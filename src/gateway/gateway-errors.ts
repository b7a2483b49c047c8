import { errorTable, type HutchError } from '../errors.js';

/** OpenAI's error object: what its SDKs read from `error` in a failed response. */
export interface OpenAiError {
  message: string;
  type: string;
  code: string;
  param: string | null;
}

function typeOf(e: HutchError): string {
  switch (e.code) {
    case 'UNAUTHENTICATED':
      return 'authentication_error';
    case 'PERMISSION_DENIED':
      return 'permission_error';
    case 'UPSTREAM_RATE_LIMITED':
    case 'RATE_LIMITED':
      return 'rate_limit_error';
    case 'UPSTREAM_TIMEOUT':
    case 'REQUEST_TIMEOUT':
      return 'timeout';
    default:
      return errorTable[e.code].http < 500 ? 'invalid_request_error' : 'api_error';
  }
}

export function openAiError(e: HutchError): OpenAiError {
  const param = e.details?.param;
  return {
    message: e.message,
    type: typeOf(e),
    code: e.code,
    param: typeof param === 'string' ? param : null,
  };
}

/**
 * A gateway error's body is hutch's `{"code","message"}` and OpenAI's `{"error":{…}}` at once,
 * so hutch's clients and the OpenAI SDKs both read it; a rate limit passes its Retry-After on.
 */
export function gatewayErrorShape(e: HutchError): {
  body: Record<string, unknown>;
  headers: Record<string, string>;
} {
  const retry = e.details?.retry_after_ms;
  return {
    body: { error: openAiError(e) },
    headers: typeof retry === 'number' ? { 'retry-after': String(Math.ceil(retry / 1000)) } : {},
  };
}
