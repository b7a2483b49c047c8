import type { AnthropicMessagesRequest, AnthropicMessagesResponse } from '../agents/model-types.js';
import type { Principal } from '../core/principal.js';
import { HutchError } from '../errors.js';

/**
 * PLACEHOLDER until the gateway branch is merged (it replaces this file): only the signature
 * the agents call, so this branch compiles. Every call answers NOT_SERVED.
 */
export class GatewayActions {
  async anthropicMessages(
    _p: Principal,
    _req: AnthropicMessagesRequest,
    _opts: { signal?: AbortSignal; beta?: string[] } = {},
  ): Promise<AnthropicMessagesResponse> {
    throw new HutchError('NOT_SERVED', 'the model gateway is not part of this build');
  }
}
