import type { Log } from '../background.js';
import type { ModelList } from './openai-types.js';
import { UpstreamCall, type UpstreamName } from './upstream.js';

export interface UpstreamConfig {
  name: UpstreamName;
  baseUrl: string;
  key: string | undefined;
}

type Entry = ModelList['data'][number];

/** How long a provider's model list is reused: lists change rarely, and each fetch costs a round trip. */
const ttlMs = 5 * 60_000;

/** Which provider serves a model: Anthropic for claude*, OpenRouter for the rest. */
export function upstreamOf(model: string): UpstreamName {
  return model.startsWith('claude') ? 'anthropic' : 'openrouter';
}

/**
 * The models each configured provider serves, fetched from its own list endpoint and cached.
 * A provider without a key lists nothing (its models are not usable here); one that cannot be
 * reached lists its fallback (HUTCH_ANTHROPIC_MODELS) or nothing, and is asked again next time.
 */
export class ModelCatalog {
  private readonly cache = new Map<UpstreamName, { at: number; data: Entry[] }>();

  constructor(
    private readonly upstreams: Record<UpstreamName, UpstreamConfig>,
    private readonly timeoutMs: number,
    private readonly anthropicFallback: string[],
    private readonly log: Log,
  ) {}

  async list(): Promise<ModelList> {
    const lists = await Promise.all((['anthropic', 'openrouter'] as const).map((u) => this.of(u)));
    return { object: 'list', data: lists.flat() };
  }

  private async of(name: UpstreamName): Promise<Entry[]> {
    const u = this.upstreams[name];
    if (!u.key) return [];
    const hit = this.cache.get(name);
    if (hit && Date.now() - hit.at < ttlMs) return hit.data;
    try {
      const data =
        name === 'anthropic'
          ? await this.anthropic(u.baseUrl, u.key)
          : await this.openrouter(u.baseUrl, u.key);
      this.cache.set(name, { at: Date.now(), data });
      return data;
    } catch (e) {
      this.log('warn', 'gateway: model list unavailable', { upstream: name, error: (e as Error).message });
      if (name === 'anthropic')
        return this.anthropicFallback.map((id) => ({
          id,
          object: 'model',
          created: 0,
          owned_by: 'anthropic',
        }));
      return [];
    }
  }

  private async anthropic(base: string, key: string): Promise<Entry[]> {
    const call = new UpstreamCall('anthropic', Math.min(this.timeoutMs, 15_000));
    const res = await call.send(`${base}/v1/models?limit=1000`, {
      method: 'GET',
      headers: { 'x-api-key': key, 'anthropic-version': '2023-06-01' },
    });
    const body = await call.json<{ data?: { id?: unknown; created_at?: unknown }[] }>(res);
    return (body.data ?? [])
      .filter((m) => typeof m.id === 'string')
      .map((m) => ({
        id: m.id as string,
        object: 'model' as const,
        created: typeof m.created_at === 'string' ? Math.floor(Date.parse(m.created_at) / 1000) || 0 : 0,
        owned_by: 'anthropic',
      }));
  }

  private async openrouter(base: string, key: string): Promise<Entry[]> {
    const call = new UpstreamCall('openrouter', Math.min(this.timeoutMs, 15_000));
    const res = await call.send(`${base}/models`, {
      method: 'GET',
      headers: { authorization: `Bearer ${key}` },
    });
    const body = await call.json<{ data?: { id?: unknown; created?: unknown; owned_by?: unknown }[] }>(res);
    return (body.data ?? [])
      .filter((m) => typeof m.id === 'string' && !(m.id as string).startsWith('claude'))
      .map((m) => {
        const id = m.id as string;
        return {
          id,
          object: 'model' as const,
          created: typeof m.created === 'number' ? m.created : 0,
          owned_by:
            typeof m.owned_by === 'string'
              ? m.owned_by
              : id.includes('/')
                ? (id.split('/')[0] as string)
                : 'openrouter',
        };
      });
  }
}
