/**
 * The Anthropic Messages wire format, as far as the agents use it. Structural on purpose: the
 * gateway (src/gateway/anthropic-types.ts) owns the full types; these only say what the agents
 * send and read, so any value of the gateway's types fits them.
 */

export interface TextBlock {
  type: 'text';
  text: string;
}

export interface ImageBlock {
  type: 'image';
  source: {
    type: 'base64';
    media_type: 'image/png' | 'image/jpeg' | 'image/gif' | 'image/webp';
    data: string;
  };
}

export interface ToolUseBlock {
  type: 'tool_use';
  id: string;
  name: string;
  /** Whatever the model sent: never trusted, checked by each tool. */
  input: unknown;
}

export interface ToolResultBlock {
  type: 'tool_result';
  tool_use_id: string;
  content: (TextBlock | ImageBlock)[];
  is_error?: boolean;
}

export type ContentBlock = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock;

export interface MessageParam {
  role: 'user' | 'assistant';
  content: string | ContentBlock[];
}

/** The Anthropic-defined tools the agents offer (their schemas are the provider's). */
export type AgentTool =
  | {
      type: 'computer_20250124' | 'computer_20251124';
      name: 'computer';
      display_width_px: number;
      display_height_px: number;
      display_number?: number;
    }
  | { type: 'bash_20250124'; name: 'bash' }
  | { type: 'text_editor_20250728'; name: 'str_replace_based_edit_tool' };

export interface AnthropicMessagesRequest {
  model: string;
  max_tokens: number;
  system?: string;
  messages: MessageParam[];
  tools?: AgentTool[];
}

export type StopReason = 'end_turn' | 'tool_use' | 'max_tokens' | 'stop_sequence' | 'refusal' | 'pause_turn';

export interface AnthropicMessagesResponse {
  id: string;
  type?: 'message';
  model: string;
  role: 'assistant';
  content: ContentBlock[];
  /** Typed wide: a newer upstream may say something this version does not know. */
  stop_reason: StopReason | (string & {}) | null;
  usage: { input_tokens: number; output_tokens: number };
}
