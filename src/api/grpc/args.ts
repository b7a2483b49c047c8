import { HutchError } from '../../errors.js';

/**
 * Checks of request fields that the proto cannot express. A failing one is INVALID_ARGUMENT and
 * nothing was changed: every handler runs these before its action.
 */

const bad = (message: string): HutchError => new HutchError('INVALID_ARGUMENT', message);

/**
 * A string field as the client meant it. protobuf strings must be UTF-8; the decoder turns
 * invalid bytes into U+FFFD (and encoded surrogates into lone surrogates) instead of failing, so
 * those stand for "not UTF-8" here (no id, name or path of ours contains them).
 */
export function text(v: string, field: string, max = 4096): string {
  if (v.includes('\uFFFD') || /\p{Surrogate}/u.test(v)) throw bad(`${field} is not valid UTF-8`);
  if (v.includes('\0')) throw bad(`${field} must not contain NUL`);
  if (Buffer.byteLength(v) > max) throw bad(`${field} is longer than ${max} bytes`);
  return v;
}

/** A VM's id or name (both are accepted wherever a vm_id is). */
export function vmRef(v: string, field = 'vm_id'): string {
  if (v === '') throw bad(`${field} is required (a VM's id or name)`);
  return text(v, field, 256);
}

/** An id field of another kind (template, token, API key). */
export function required(v: string, field: string): string {
  if (v === '') throw bad(`${field} is required`);
  return text(v, field, 256);
}

const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/** An optional name: empty = none; else letters, digits, ".", "_" and "-", at most 63. */
export function optionalName(v: string, field = 'name'): string | undefined {
  if (v === '') return undefined;
  text(v, field, 256);
  if (!namePattern.test(v))
    throw bad(`${field} ${JSON.stringify(v)} is invalid: letters, digits, ".", "_" and "-", at most 63`);
  return v;
}

/**
 * A uint64 field (decimal string with longs: String) as a number: the values we take (bytes,
 * seconds) stay far below 2^53, and one above is refused rather than rounded.
 */
export function u64(v: string | number, field: string): number {
  const n = typeof v === 'number' ? v : Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw bad(`${field} ${v} is out of range`);
  return n;
}

/** An absolute guest path: no NUL, no ".." component, not a directory (no trailing "/"). */
export function guestPath(v: string, field = 'path'): string {
  text(v, field, 4096);
  if (!v.startsWith('/')) throw bad(`${field} must be an absolute path, got ${JSON.stringify(v)}`);
  if (v.split('/').includes('..')) throw bad(`${field} must not contain ".."`);
  if (v.endsWith('/')) throw bad(`${field} names a directory; give the file's path`);
  return v;
}
