/**
 * The one table of error codes. Every adapter (REST machines, later REST boxes and gRPC) maps a
 * HutchError through this table, so a code means the same thing on every surface. Codes are a
 * public contract: never rename or reuse one; add new ones at the end. docs/errors.md is checked
 * against this table by the test suite.
 */
export const errorTable = {
  INVALID_JSON: { http: 400, grpc: 'INVALID_ARGUMENT', doc: 'The request body is not valid JSON.' },
  INVALID_ARGUMENT: {
    http: 400,
    grpc: 'INVALID_ARGUMENT',
    doc: 'A field is missing, of the wrong type or out of range.',
  },
  BODY_TOO_LARGE: {
    http: 413,
    grpc: 'INVALID_ARGUMENT',
    doc: 'The request body is larger than the server accepts.',
  },
  ROUTE_NOT_FOUND: { http: 404, grpc: 'UNIMPLEMENTED', doc: 'No endpoint has this path.' },
  METHOD_NOT_ALLOWED: { http: 405, grpc: 'UNIMPLEMENTED', doc: 'The path exists but not with this method.' },
  TEMPLATE_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No template has this name.' },
  TEMPLATE_NOT_READY: { http: 503, grpc: 'UNAVAILABLE', doc: 'The template exists but is not built yet.' },
  TEMPLATE_BUILD_FAILED: {
    http: 500,
    grpc: 'INTERNAL',
    doc: 'Building a template failed; the message carries the log tail.',
  },
  MACHINE_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No machine of yours has this id or name.' },
  MACHINE_NOT_RUNNING: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The machine exists but is not running (starting, failed or being destroyed).',
  },
  NAME_TAKEN: { http: 409, grpc: 'ALREADY_EXISTS', doc: 'Another machine of yours already has this name.' },
  RESOURCE_EXHAUSTED: {
    http: 429,
    grpc: 'RESOURCE_EXHAUSTED',
    doc: 'A cap (running machines or total guest memory) would be exceeded.',
  },
  NETWORK_UNAVAILABLE: {
    http: 501,
    grpc: 'UNIMPLEMENTED',
    doc: 'Guest networking is off on this server (HUTCH_NET=off, or its host setup failed: the log says why).',
  },
  BOOT_FAILED: {
    http: 500,
    grpc: 'INTERNAL',
    doc: 'The machine did not boot (QEMU failed or its agent never answered); nothing was left behind.',
  },
  AGENT_UNAVAILABLE: {
    http: 502,
    grpc: 'UNAVAILABLE',
    doc: 'The in-guest agent is not answering (the machine died or broke its protocol).',
  },
  EXEC_FAILED: {
    http: 422,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The command could not be started in the guest (e.g. ENOENT: no such program).',
  },
  SNAPSHOT_NOT_READY: {
    http: 503,
    grpc: 'UNAVAILABLE',
    doc: '"mode": "snapshot" was asked for, but the template\'s snapshot is not built yet.',
  },
  INTERNAL: { http: 500, grpc: 'INTERNAL', doc: 'An unexpected server error; the server log has details.' },
  BOX_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No box of yours has this id or name.' },
  BOX_NOT_RUNNING: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The box exists but is not running (stopped, starting or stopping): start it first.',
  },
  BOX_RUNNING: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The box is running: stop it first, or remove it with ?force=true.',
  },
  EXEC_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'The box has no exec with this id.' },
  LIMIT_EXCEEDED: {
    http: 400,
    grpc: 'INVALID_ARGUMENT',
    doc: 'A requested size (cpu, memory_mb, disk_size_gb) is over the limit GET /v1/info reports.',
  },
  VOLUME_NOT_ALLOWED: {
    http: 403,
    grpc: 'PERMISSION_DENIED',
    doc: "A volume's host_path is not inside a directory the server allows (HUTCH_VOLUME_ROOTS).",
  },
  IMAGE_NOT_FOUND: {
    http: 404,
    grpc: 'NOT_FOUND',
    doc: 'The registry has no such image repository or tag (or denies access to it).',
  },
  IMAGE_PULL_FAILED: {
    http: 502,
    grpc: 'UNAVAILABLE',
    doc: "Pulling the image failed (registry unreachable or a broken image); the message carries skopeo's or umoci's error.",
  },
  FILE_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No file at this path in the machine or box.' },
  NOT_A_FILE: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The path names a directory (or something else that is not a regular file).',
  },
  FILE_TRANSFER_FAILED: {
    http: 422,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The guest could not read or write the file (e.g. ENOSPC, EACCES); the errno is in `errno`.',
  },
  UPGRADE_REQUIRED: {
    http: 426,
    grpc: 'INVALID_ARGUMENT',
    doc: 'The endpoint is a WebSocket: ask for an upgrade (Connection: Upgrade, Upgrade: websocket).',
  },
  STORAGE_FULL: {
    http: 507,
    grpc: 'RESOURCE_EXHAUSTED',
    doc: "The host's state filesystem is full (or this would commit more disk than it can give); nothing was changed. Other operations keep working.",
  },
  REQUEST_TIMEOUT: {
    http: 408,
    grpc: 'DEADLINE_EXCEEDED',
    doc: 'The request body stopped arriving (no bytes for too long); the connection is closed.',
  },
  UNAUTHENTICATED: {
    http: 401,
    grpc: 'UNAUTHENTICATED',
    doc: 'No valid credential: the bearer token is missing (where one is required), malformed, expired or revoked, or the API key is unknown, deleted or expired.',
  },
  RATE_LIMITED: {
    http: 429,
    grpc: 'RESOURCE_EXHAUSTED',
    doc: 'Too many requests of this kind from this source address (API key exchanges); retry after `retry_after_ms`.',
  },
  NOT_SERVED: {
    http: 501,
    grpc: 'UNIMPLEMENTED',
    doc: 'The operation belongs to a capability this version does not serve yet (disks); the message says which.',
  },
  USER_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No user has this name.' },
  USER_EXISTS: { http: 409, grpc: 'ALREADY_EXISTS', doc: 'A user with this name already exists.' },
  API_KEY_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No API key of yours has this id.' },
  TOKEN_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No token of yours has this jti.' },
  PERMISSION_DENIED: {
    http: 403,
    grpc: 'PERMISSION_DENIED',
    doc: 'The caller may not do this at all (e.g. mint API keys or tokens from inside a machine, whose identity must not leave it).',
  },
  NOT_SUPPORTED: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The operation is not possible for this object as it is (e.g. forking a box that mounts host directories); the message says why.',
  },
  PORT_NOT_LISTENING: {
    http: 502,
    grpc: 'UNAVAILABLE',
    doc: 'Nothing in the machine accepts connections on this port (a preview or proxy to it); start the server, then retry.',
  },
  PROXY_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No proxy of yours has this name or id.' },
  DOMAIN_TAKEN: {
    http: 409,
    grpc: 'ALREADY_EXISTS',
    doc: 'The domain is already bound (by you or another user).',
  },
  DOMAIN_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No domain of yours has this name.' },
  NETWORK_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No network of yours has this id or name.' },
  VOLUME_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No volume of yours has this id (or it expired).' },
  VOLUME_BUSY: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'A save into or a restore from this volume is running; try again when it has finished.',
  },
  VOLUME_TOO_LARGE: {
    http: 413,
    grpc: 'RESOURCE_EXHAUSTED',
    doc: 'The volume would hold more bytes or files than HUTCH_VOLUME_MAX_BYTES / HUTCH_VOLUME_MAX_FILES allow; its previous version is kept.',
  },
  STORAGE_UNAVAILABLE: {
    http: 503,
    grpc: 'UNAVAILABLE',
    doc: 'The volume store (the S3 endpoint) did not answer or failed; nothing was changed. Retry later.',
  },
  DISK_NOT_FOUND: { http: 404, grpc: 'NOT_FOUND', doc: 'No disk of yours has this id or name.' },
  DISK_NAME_TAKEN: { http: 409, grpc: 'ALREADY_EXISTS', doc: 'Another disk of yours already has this name.' },
  DISK_ATTACHED: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The disk is attached where this is not allowed: read-write elsewhere, to this machine already, or (DestroyDisk) anywhere.',
  },
  DISK_NOT_ATTACHED: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The disk is not attached to this machine.',
  },
  DISK_BUSY: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'A process in the guest has files open under the mount path, so the disk cannot be unmounted; nothing was changed.',
  },
  PREVIEW_TIMEOUT: {
    http: 504,
    grpc: 'DEADLINE_EXCEEDED',
    doc: 'The server in the machine accepted the preview request but sent no response headers in time (HUTCH_PREVIEW_TIMEOUT_MS).',
  },
  PREVIEW_UPSTREAM_FAILED: {
    http: 502,
    grpc: 'UNAVAILABLE',
    doc: 'The server in the machine closed or broke the connection before answering a preview request (or sent something that is not HTTP/1.1).',
  },
  VOLUME_SAVE_FAILED: {
    http: 422,
    grpc: 'FAILED_PRECONDITION',
    doc: "The machine's /root could not be saved: tar in the guest failed, or sent an archive hutch refuses (an absolute path or one with `..`, a hard link to nothing saved, not tar at all); the message says which. The volume's previous version is kept.",
  },
  VOLUME_RESTORE_FAILED: {
    http: 422,
    grpc: 'FAILED_PRECONDITION',
    doc: 'tar in the new machine could not unpack the volume into /root (e.g. its disk is full); the message carries its stderr. The machine was destroyed.',
  },
  NO_DISPLAY: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'The machine has no display (only machines of the desktop template have one): no screenshot, input, VNC or computer-use agent.',
  },
  MODEL_NOT_FOUND: {
    http: 404,
    grpc: 'NOT_FOUND',
    doc: 'No model of this name is served: unknown to its upstream, or its upstream (Anthropic for claude*, OpenRouter for the rest) has no key configured; GET /v1/models lists what is usable.',
  },
  UPSTREAM_FAILED: {
    http: 502,
    grpc: 'UNAVAILABLE',
    doc: 'The model provider answered with an error or something that is not its API; the message carries its status and message.',
  },
  UPSTREAM_RATE_LIMITED: {
    http: 429,
    grpc: 'RESOURCE_EXHAUSTED',
    doc: 'The model provider refused the request for its rate limits or quota; retry later (Retry-After is passed on when it sent one).',
  },
  UPSTREAM_TIMEOUT: {
    http: 504,
    grpc: 'DEADLINE_EXCEEDED',
    doc: "The model provider did not answer within the gateway's time limit (HUTCH_GATEWAY_TIMEOUT_MS).",
  },
  AGENT_BUSY: {
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    doc: 'An agent is already running on this machine (one at a time); stop it or wait for its `done`.',
  },
} as const;

export type ErrorCode = keyof typeof errorTable;

export class HutchError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;
  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'HutchError';
    this.code = code;
    this.details = details;
  }
  get httpStatus(): number {
    return errorTable[this.code].http;
  }
}

export function isHutchError(e: unknown): e is HutchError {
  return e instanceof HutchError;
}

/** Wraps anything thrown into a HutchError, keeping a HutchError as it is. */
export function toHutchError(e: unknown): HutchError {
  if (e instanceof HutchError) return e;
  const message = e instanceof Error ? e.message : String(e);
  return new HutchError('INTERNAL', message);
}

/** Whether an error is the host running out of space (a file write, qemu-img, SQLite). */
export function isDiskFull(e: unknown): boolean {
  const err = e as { code?: unknown; message?: unknown };
  if (err?.code === 'ENOSPC' || err?.code === 'EDQUOT' || err?.code === 'SQLITE_FULL') return true;
  return /ENOSPC|EDQUOT|No space left on device|SQLITE_FULL/.test(String(err?.message));
}

/**
 * The error for a failed operation: STORAGE_FULL when the host ran out of space on the way (the
 * caller has undone what it made), else `code`. A full disk is the operator's to fix, not a bug.
 */
export function orStorageFull(
  e: unknown,
  code: ErrorCode,
  message: string,
  details?: Record<string, unknown>,
): HutchError {
  if (e instanceof HutchError) return e;
  if (isDiskFull(e)) return new HutchError('STORAGE_FULL', `the host's disk is full: ${message}`);
  return new HutchError(code, message, details);
}
