/**
 * The Anthropic Messages API's wire types (POST /v1/messages), as far as hutch sends and reads
 * them: the gateway's translation and the computer-use/shell agents (src/agents/) share these, so
 * an agent builds a request once and the gateway sends it as is.
 */

export interface AnthropicTextBlock {
  type: 'text';
  text: string;
}

export interface AnthropicImageBlock {
  type: 'image';
  source:
    | { type: 'base64'; media_type: 'image/png' | 'image/jpeg' | 'image/gif' | 'image/webp'; data: string }
    | { type: 'url'; url: string };
}

export interface AnthropicToolUseBlock {
  type: 'tool_use';
  id: string;
  name: string;
  /** What the model sent: a JSON object from the API, anything from a client (checked where used). */
  input: unknown;
}

export interface AnthropicToolResultBlock {
  type: 'tool_result';
  tool_use_id: string;
  content?: string | (AnthropicTextBlock | AnthropicImageBlock)[];
  is_error?: boolean;
}

/** Extended thinking, when a request enables it: passed back unchanged in later turns. */
export interface AnthropicThinkingBlock {
  type: 'thinking';
  thinking: string;
  signature: string;
}

export type AnthropicContentBlock =
  | AnthropicTextBlock
  | AnthropicImageBlock
  | AnthropicToolUseBlock
  | AnthropicToolResultBlock
  | AnthropicThinkingBlock;

export interface AnthropicMessage {
  role: 'user' | 'assistant';
  content: string | AnthropicContentBlock[];
}

/** A tool the caller implements: the model sees its name, description and JSON Schema. */
export interface AnthropicCustomTool {
  type?: 'custom';
  name: string;
  description?: string;
  input_schema: Record<string, unknown>;
}

/** Anthropic-defined tools (computer use, bash, text editor): their schema is the model's own. */
export interface AnthropicComputerTool {
  type: 'computer_20250124' | 'computer_20251124';
  name: 'computer';
  display_width_px: number;
  display_height_px: number;
  display_number?: number;
}

export interface AnthropicBashTool {
  type: 'bash_20250124';
  name: 'bash';
}

export interface AnthropicTextEditorTool {
  type: 'text_editor_20250728' | 'text_editor_20250124';
  name: 'str_replace_based_edit_tool';
  max_characters?: number;
}

export type AnthropicTool =
  | AnthropicCustomTool
  | AnthropicComputerTool
  | AnthropicBashTool
  | AnthropicTextEditorTool;

export type AnthropicToolChoice =
  | { type: 'auto'; disable_parallel_tool_use?: boolean }
  | { type: 'any'; disable_parallel_tool_use?: boolean }
  | { type: 'tool'; name: string; disable_parallel_tool_use?: boolean }
  | { type: 'none' };

export interface AnthropicMessagesRequest {
  model: string;
  max_tokens: number;
  system?: string | AnthropicTextBlock[];
  messages: AnthropicMessage[];
  tools?: AnthropicTool[];
  tool_choice?: AnthropicToolChoice;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  stop_sequences?: string[];
  metadata?: { user_id?: string };
  stream?: boolean;
}

export type AnthropicStopReason =
  | 'end_turn'
  | 'max_tokens'
  | 'stop_sequence'
  | 'tool_use'
  | 'pause_turn'
  | 'refusal';

export interface AnthropicUsage {
  input_tokens: number;
  output_tokens: number;
  cache_creation_input_tokens?: number | null;
  cache_read_input_tokens?: number | null;
}

export interface AnthropicMessagesResponse {
  id: string;
  type: 'message';
  role: 'assistant';
  model: string;
  content: AnthropicContentBlock[];
  stop_reason: AnthropicStopReason | null;
  stop_sequence: string | null;
  usage: AnthropicUsage;
}

/** The events of a streamed response (`stream: true`), by their `type`. */
export type AnthropicStreamEvent =
  | { type: 'message_start'; message: AnthropicMessagesResponse }
  | {
      type: 'content_block_start';
      index: number;
      content_block: AnthropicTextBlock | AnthropicToolUseBlock | AnthropicThinkingBlock;
    }
  | {
      type: 'content_block_delta';
      index: number;
      delta:
        | { type: 'text_delta'; text: string }
        | { type: 'input_json_delta'; partial_json: string }
        | { type: 'thinking_delta'; thinking: string }
        | { type: 'signature_delta'; signature: string };
    }
  | { type: 'content_block_stop'; index: number }
  | {
      type: 'message_delta';
      delta: { stop_reason: AnthropicStopReason | null; stop_sequence: string | null };
      usage: Partial<AnthropicUsage>;
    }
  | { type: 'message_stop' }
  | { type: 'ping' }
  | { type: 'error'; error: { type: string; message: string } };

/** Anthropic's error body: `{"type":"error","error":{"type","message"}}`. */
export interface AnthropicErrorBody {
  type: 'error';
  error: { type: string; message: string };
}
