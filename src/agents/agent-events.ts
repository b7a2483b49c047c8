/**
 * What an agent run tells its client, in order, as it happens (docs/agents.md). JSON-ready: the
 * WebSocket channel sends each as one text frame.
 */
export type AgentOutcome = 'completed' | 'stopped' | 'step_limit' | 'time_limit' | 'error';

export interface Usage {
  input_tokens: number;
  output_tokens: number;
}

export type AgentEvent =
  | { type: 'start'; goal: string; model: string; tool_version: string }
  | { type: 'text'; text: string }
  | { type: 'action'; step: number; name: string; input: unknown }
  /** A screenshot the model was shown; `data` (base64 PNG) only when the client asked for it. */
  | { type: 'screenshot'; step: number; width: number; height: number; data?: string }
  | { type: 'result'; step: number; ok: boolean; output?: string }
  | { type: 'error'; code: string; message: string }
  | {
      type: 'done';
      outcome: AgentOutcome;
      steps: number;
      usage: Usage;
      preview_urls?: string[];
    };

/**
 * A one-producer, one-consumer queue of events as an async iterable. The producer never waits:
 * events are small (an inline screenshot is the biggest, one per step), and a run has a step cap.
 */
export class EventQueue<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private wake: (() => void) | undefined;
  private ended = false;

  push(item: T): void {
    if (this.ended) return;
    this.items.push(item);
    this.wake?.();
  }

  end(): void {
    this.ended = true;
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<T> {
    for (;;) {
      const item = this.items.shift();
      if (item !== undefined) {
        yield item;
        continue;
      }
      if (this.ended) return;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
      this.wake = undefined;
    }
  }
}
