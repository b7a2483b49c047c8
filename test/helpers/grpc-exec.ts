import { createHash } from 'node:crypto';
import type * as grpc from '@grpc/grpc-js';
import type { BoxdClient } from './grpc.js';

export interface ExecOutcome {
  out: Buffer;
  exit: number;
  sha256: string;
  messages: number;
}

/**
 * Runs `command` over the Exec stream: the first message names the VM and the command; stdin
 * chunks follow as stdin messages, then an empty stdin message (EOF) — or a half-close when
 * `eof: 'half-close'`. Output is kept (up to keepBytes) and hashed as it comes.
 */
export function grpcExec(
  c: BoxdClient,
  vmId: string,
  command: string,
  opts: {
    stdin?: Buffer[];
    tty?: boolean;
    eof?: 'empty' | 'half-close' | 'none';
    keepBytes?: number;
    token?: string;
  } = {},
): { done: Promise<ExecOutcome>; call: grpc.ClientDuplexStream<unknown, unknown> } {
  const call = (c.raw.Exec as (m: grpc.Metadata) => grpc.ClientDuplexStream<unknown, unknown>)(
    c.meta(opts.token),
  );
  const keep = opts.keepBytes ?? 1024 * 1024;
  const parts: Buffer[] = [];
  let kept = 0;
  let messages = 0;
  let exit = -999;
  const hash = createHash('sha256');
  const done = new Promise<ExecOutcome>((resolve, reject) => {
    call.on('data', (m: { data: Buffer; exit_code: number }) => {
      messages++;
      hash.update(m.data);
      if (kept < keep) {
        parts.push(m.data);
        kept += m.data.length;
      }
      exit = m.exit_code;
    });
    call.on('error', reject);
    call.on('end', () => resolve({ out: Buffer.concat(parts), exit, sha256: hash.digest('hex'), messages }));
  });
  call.write({ vm_id: vmId, command, tty: opts.tty ?? false });
  for (const b of opts.stdin ?? []) call.write({ stdin: true, data: b });
  const eof = opts.eof ?? 'empty';
  if (eof === 'empty') call.write({ stdin: true, data: Buffer.alloc(0) });
  if (eof === 'half-close') call.end();
  return { done, call };
}
