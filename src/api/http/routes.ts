import type { IncomingMessage, ServerResponse } from 'node:http';
import type { WebSocket } from 'ws';
import type { z } from 'zod';
import { HutchError } from '../../errors.js';

/**
 * The one route table format of every HTTP surface (machines on TCP, boxes on the Unix socket
 * and TCP). A route says what it reads (path parameters, a zod schema for its query, one for
 * its JSON body) and how it answers (`kind`); the server (server.ts) matches, parses and
 * validates all of it before the handler runs, writes the answer, and turns every HutchError
 * into the same `{"code","message"}` response. The same tables generate the OpenAPI documents.
 *
 * - json: the handler returns a value, sent as JSON with `status` (HeldText streamed).
 * - ndjson: the handler calls `ndjson()` once it can answer (errors before that are ordinary
 *   HTTP errors), then writes one event per line.
 * - sse: the handler returns events ({event, data}); the server writes them as Server-Sent Events
 *   and stops reading them when the client goes away.
 * - raw: the handler reads the request (uploads) or writes the response (downloads) itself; a
 *   value it returns is sent as JSON with `status`.
 * - websocket: a GET answered with an upgrade; the handler refuses (an HTTP error) or `accept`s.
 */
export type Method = 'GET' | 'POST' | 'PUT' | 'DELETE';

/** Documentation a schema cannot give: headers, a raw request body, non-JSON responses. */
export interface RouteDoc {
  parameters?: unknown[];
  requestBody?: unknown;
  responses: Record<string, unknown>;
}

type Out<S> = S extends z.ZodType ? z.output<S> : undefined;

/** What every handler gets besides its API's own context (engine, owner, …). */
export interface RequestParts<Q, B> {
  params: Record<string, string>;
  /** The query, parsed by the route's `query` schema (undefined without one). */
  query: Q;
  /** The JSON body, parsed by the route's `body` schema (undefined without one). */
  body: B;
  req: IncomingMessage;
}

export interface StreamParts {
  res: ServerResponse;
  /** Aborted when the client goes away before the answer is complete. */
  signal: AbortSignal;
}

export interface SseEvent {
  event: string;
  data: unknown;
}

interface Common {
  path: string;
  summary: string;
  description?: string;
  /** Query parameters: validated by this schema (on WebSocket routes too, before the upgrade). */
  query?: z.ZodObject;
  /** A JSON body (at most 1 MiB, or `maxBodyBytes`), validated by this schema. */
  body?: z.ZodType;
  /** A larger limit for this route's JSON body (chat requests carry base64 images). */
  maxBodyBytes?: number;
  /** Served without authentication (the handler gets no caller's actions): health, token exchange. */
  public?: boolean;
  /**
   * What this route adds to each error it answers (refused credentials and bodies included):
   * body fields and headers of another API's error format, for clients of that API (the model
   * gateway's OpenAI `error` object).
   */
  errorShape?: ErrorShape;
}

export type ErrorShape = (e: HutchError) => {
  body?: Record<string, unknown>;
  headers?: Record<string, string>;
};

// Handlers are declared with method syntax: a route's handler takes its own parsed types, and
// the table holds routes of every shape.
export type ApiRoute<A> = Common &
  (
    | {
        kind: 'json';
        method: Method;
        status: number;
        response?: z.ZodType;
        handle(ctx: A & RequestParts<unknown, unknown> & Pick<StreamParts, 'signal'>): unknown;
      }
    | {
        kind: 'ndjson';
        method: Method;
        status: number;
        doc: RouteDoc;
        handle(
          ctx: A & RequestParts<unknown, unknown> & StreamParts & { ndjson: () => NdjsonWriter },
        ): Promise<void>;
      }
    | {
        kind: 'sse';
        method: 'GET';
        status: number;
        doc: RouteDoc;
        handle(
          ctx: A & RequestParts<unknown, unknown>,
        ): AsyncGenerator<SseEvent> | Promise<AsyncGenerator<SseEvent>>;
      }
    | {
        kind: 'raw';
        method: Method;
        status: number;
        doc: RouteDoc;
        handle(ctx: A & RequestParts<unknown, unknown> & StreamParts): Promise<unknown>;
      }
    | {
        kind: 'websocket';
        method: 'GET';
        description: string;
        handle(ctx: A & RequestParts<unknown, unknown> & { accept: () => Promise<WebSocket> }): Promise<void>;
      }
  );

/** Writes one NDJSON line, waiting while the client is slow; rejects once it has gone. */
export type NdjsonWriter = (event: unknown) => Promise<void>;

type Ctx<A, S, B> = A & RequestParts<Out<S>, Out<B>>;

type Shape<S, B> = Omit<Common, 'query' | 'body'> & { query?: S; body?: B };

/**
 * Builders for one API's table (A: what its handlers get, e.g. the engine and the owner), typed
 * so a handler sees its own query and body types.
 */
export function routesOf<A>() {
  return {
    json: <S extends z.ZodObject | undefined = undefined, B extends z.ZodType | undefined = undefined>(
      r: Shape<S, B> & {
        method: Method;
        status: number;
        response?: z.ZodType;
        /** `signal`: aborted when the client goes away before the answer is complete. */
        handle(ctx: Ctx<A, S, B> & Pick<StreamParts, 'signal'>): unknown;
      },
    ): ApiRoute<A> => ({ kind: 'json', ...r }) as ApiRoute<A>,
    ndjson: <S extends z.ZodObject | undefined = undefined, B extends z.ZodType | undefined = undefined>(
      r: Shape<S, B> & {
        method: Method;
        status: number;
        doc: RouteDoc;
        handle(ctx: Ctx<A, S, B> & StreamParts & { ndjson: () => NdjsonWriter }): Promise<void>;
      },
    ): ApiRoute<A> => ({ kind: 'ndjson', ...r }) as ApiRoute<A>,
    sse: <S extends z.ZodObject | undefined = undefined>(
      r: Shape<S, undefined> & {
        status: number;
        doc: RouteDoc;
        handle(ctx: Ctx<A, S, undefined>): AsyncGenerator<SseEvent> | Promise<AsyncGenerator<SseEvent>>;
      },
    ): ApiRoute<A> => ({ kind: 'sse', method: 'GET', ...r }) as ApiRoute<A>,
    raw: <S extends z.ZodObject | undefined = undefined, B extends z.ZodType | undefined = undefined>(
      r: Shape<S, B> & {
        method: Method;
        status: number;
        doc: RouteDoc;
        handle(ctx: Ctx<A, S, B> & StreamParts): Promise<unknown>;
      },
    ): ApiRoute<A> => ({ kind: 'raw', ...r }) as ApiRoute<A>,
    websocket: <S extends z.ZodObject | undefined = undefined>(
      r: Shape<S, undefined> & {
        description: string;
        handle(ctx: Ctx<A, S, undefined> & { accept: () => Promise<WebSocket> }): Promise<void>;
      },
    ): ApiRoute<A> => ({ kind: 'websocket', method: 'GET', ...r }) as ApiRoute<A>,
  };
}

/** Parses with a schema, turning failures into one INVALID_ARGUMENT with every problem listed. */
export function parseWith<T extends z.ZodType>(schema: T, value: unknown, what = 'body'): z.infer<T> {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const issues = r.error.issues
    .map((i) => `${i.path.length ? i.path.join('.') : what}: ${i.message}`)
    .join('; ');
  throw new HutchError('INVALID_ARGUMENT', issues);
}
