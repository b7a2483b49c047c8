/**
 * A thin client of the public machines API. The CLI (and later the SDK and MCP server) use only
 * this: adapters add no behaviour of their own.
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

export class HutchClient {
  constructor(readonly baseUrl: string) {}

  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    let res: Response;
    try {
      res = await fetch(new URL(path, this.baseUrl), {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? null : JSON.stringify(body),
      });
    } catch (e) {
      const cause = (e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message;
      throw new ApiError(
        0,
        'UNREACHABLE',
        `cannot reach the hutch daemon at ${this.baseUrl} (${cause}); is \`hutch serve\` running?`,
      );
    }
    const text = await res.text();
    const json: unknown = text ? JSON.parse(text) : undefined;
    if (!res.ok) {
      const e = (json ?? {}) as { code?: string; message?: string };
      throw new ApiError(res.status, e.code ?? `HTTP_${res.status}`, e.message ?? res.statusText);
    }
    return json as T;
  }

  health<T = Record<string, unknown>>(): Promise<T> {
    return this.request('GET', '/healthz');
  }
  createMachine<T = Record<string, unknown>>(body: Record<string, unknown>): Promise<T> {
    return this.request('POST', '/v1/machines', body);
  }
  listMachines<T = { machines: Record<string, unknown>[] }>(): Promise<T> {
    return this.request('GET', '/v1/machines');
  }
  getMachine<T = Record<string, unknown>>(id: string): Promise<T> {
    return this.request('GET', `/v1/machines/${encodeURIComponent(id)}`);
  }
  destroyMachine(id: string): Promise<void> {
    return this.request('DELETE', `/v1/machines/${encodeURIComponent(id)}`);
  }
  exec<T = Record<string, unknown>>(id: string, body: Record<string, unknown>): Promise<T> {
    return this.request('POST', `/v1/machines/${encodeURIComponent(id)}/exec`, body);
  }
}
