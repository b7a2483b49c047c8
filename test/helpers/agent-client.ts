import { WebSocket } from 'ws';
import type { AgentEvent } from '../../src/agents/agent-events.js';

/**
 * A client of the agents' WebSocket channels for tests and benches; the model mock they drive
 * them with is test/helpers/mock-llm.ts (re-exported here).
 */
export { type MockLlm, type MockTurn, type RecordedRequest, startMockLlm } from './mock-llm.js';

/** A full Anthropic Message, as the mock answers. */
export function message(
  content: object[],
  stopReason: 'tool_use' | 'end_turn' = 'tool_use',
  usage = { input_tokens: 100, output_tokens: 20 },
): { response: object } {
  return {
    response: {
      id: `msg_${Math.random().toString(36).slice(2)}`,
      type: 'message',
      role: 'assistant',
      model: 'claude-sonnet-4-5',
      content,
      stop_reason: stopReason,
      stop_sequence: null,
      usage,
    },
  };
}

let seq = 0;
export function toolUse(name: string, input: object): object {
  return { type: 'tool_use', id: `toolu_${++seq}`, name, input };
}

export function endTurn(text = 'Done.'): { response: object } {
  return message([{ type: 'text', text }], 'end_turn');
}

/** The ws URL of an agent channel. */
export function agentUrl(base: string, path: string, query: Record<string, string>): string {
  const u = new URL(path, base);
  for (const [k, v] of Object.entries(query)) u.searchParams.set(k, v);
  return u.href.replace(/^http/, 'ws');
}

export interface AgentSession {
  ws: WebSocket;
  /** Every event, in order, with when it arrived (ms since open). */
  events: (AgentEvent & { at?: number })[];
  /** Resolves with the close code once the socket closes. */
  closed: Promise<{ code: number; reason: string }>;
  /** Resolves when an event of this type arrives. */
  next(type: AgentEvent['type']): Promise<AgentEvent>;
  send(v: unknown): void;
}

/** Opens an agent channel; rejects with `{status, body}` if the upgrade is refused. */
export function openAgent(url: string, token?: string): Promise<AgentSession> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, token ? { headers: { authorization: `Bearer ${token}` } } : {});
    const events: AgentSession['events'] = [];
    const waiters: { type: string; resolve: (e: AgentEvent) => void }[] = [];
    const t0 = performance.now();
    const closed = new Promise<{ code: number; reason: string }>((r) =>
      ws.on('close', (code, reason) => r({ code, reason: reason.toString() })),
    );
    ws.on('message', (data) => {
      const e = JSON.parse(data.toString()) as AgentEvent;
      events.push({ ...e, at: performance.now() - t0 });
      for (const w of [...waiters])
        if (w.type === e.type) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(e);
        }
    });
    ws.on('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (c: Buffer) => {
        body += c.toString();
      });
      res.on('end', () => {
        let parsed: unknown = body;
        try {
          parsed = JSON.parse(body);
        } catch {}
        reject({ status: res.statusCode, body: parsed });
      });
    });
    ws.on('error', (e) => reject(e));
    ws.on('open', () =>
      resolve({
        ws,
        events,
        closed,
        next: (type) => {
          const have = events.find((e) => e.type === type);
          if (have) return Promise.resolve(have);
          return new Promise((r) => waiters.push({ type, resolve: r }));
        },
        send: (v) => ws.send(JSON.stringify(v)),
      }),
    );
  });
}

/** Opens, waits for the close, and returns every event. */
export async function runAgent(url: string, token?: string): Promise<AgentSession> {
  const s = await openAgent(url, token);
  await s.closed;
  return s;
}

/** What a refused upgrade answered. */
export async function refusal(
  url: string,
  token?: string,
): Promise<{ status: number; body: { code?: string } }> {
  try {
    const s = await openAgent(url, token);
    s.ws.close();
    return { status: 101, body: {} };
  } catch (e) {
    return e as { status: number; body: { code?: string } };
  }
}
