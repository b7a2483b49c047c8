import type { ServerWritableStream } from '@grpc/grpc-js';
import { HutchError } from '../../errors.js';
import { guestPath, vmRef } from './args.js';
import { type Cx, type Rpc, serverStream, unary } from './rpc.js';

/**
 * StreamLogs (the serial console) and whole-file transfer. The file RPCs are unary: a file
 * travels as one message, so both directions are bounded by GrpcApp.maxFileBytes (the server's
 * message limits are set from it).
 */

interface LogsRequest {
  vm_id: string;
  follow: boolean;
}

/**
 * What a following reader may leave unread before it is let go: the console does not wait for
 * anyone (the guest's serial port is not paused for a slow viewer), so a reader that cannot keep
 * up ends with RESOURCE_EXHAUSTED rather than growing the daemon's memory.
 */
const maxUnsentLogBytes = 4 * 1024 * 1024;

async function streamLogs(call: ServerWritableStream<LogsRequest, { data: Buffer }>, cx: Cx): Promise<void> {
  const c = cx.act.boxConsoleOf(vmRef(call.request.vm_id));
  const recent = c.console.recent();
  if (!call.request.follow) {
    // Without follow: what is buffered now (the console ring), then the end.
    if (recent.length) call.write({ data: recent });
    return;
  }
  let unsent = 0;
  const send = (b: Buffer): boolean => {
    unsent += b.length;
    if (unsent > maxUnsentLogBytes) return false;
    call.write({ data: b }, () => {
      unsent -= b.length;
    });
    return true;
  };
  await new Promise<void>((resolve, reject) => {
    const finish = (e?: HutchError): void => {
      c.console.off('data', onData);
      c.console.off('stop', onStop);
      call.off('cancelled', onCancel);
      if (e) reject(e);
      else resolve();
    };
    const onData = (b: Buffer): void => {
      if (!send(b))
        finish(new HutchError('RESOURCE_EXHAUSTED', 'the log reader fell behind the console; reconnect'));
    };
    const onStop = (): void => finish();
    const onCancel = (): void => finish();
    // Replay then subscribe in one tick: no output is lost or sent twice.
    if (recent.length) send(recent);
    c.console.on('data', onData);
    c.console.once('stop', onStop);
    call.once('cancelled', onCancel);
  });
}

interface UploadRequest {
  vm_id: string;
  path: string;
  data: Buffer;
}

interface DownloadRequest {
  vm_id: string;
  path: string;
}

async function uploadFile(req: UploadRequest, cx: Cx): Promise<Record<string, never>> {
  const vm = vmRef(req.vm_id);
  const path = guestPath(req.path);
  const ops = await cx.act.openBoxSession(vm);
  try {
    await ops.writeFile(path, req.data, { mode: 0o644, mkdirs: true });
  } finally {
    ops.release();
  }
  return {};
}

async function downloadFile(req: DownloadRequest, cx: Cx): Promise<{ data: Buffer }> {
  const vm = vmRef(req.vm_id);
  const path = guestPath(req.path);
  const max = cx.app.maxFileBytes;
  const tooBig = (size: string): HutchError =>
    new HutchError(
      'FILE_TRANSFER_FAILED',
      `${path} is ${size}, over DownloadFile's limit of ${max} bytes (one gRPC message); read it in parts with Exec, or use the boxes REST download`,
    );
  const ops = await cx.act.openBoxSession(vm);
  try {
    const f = await ops.readFile(path);
    if (f.size !== undefined && f.size > max) {
      f.close();
      throw tooBig(`${f.size} bytes`);
    }
    const parts: Buffer[] = [];
    let n = 0;
    for await (const b of f.chunks()) {
      n += b.length;
      // A size the guest did not know (or lied about) is checked as the bytes come.
      if (n > max) {
        f.close();
        throw tooBig(`more than ${max} bytes`);
      }
      parts.push(b);
    }
    return { data: Buffer.concat(parts, n) };
  } finally {
    ops.release();
  }
}

export const logsFilesRpcs: Record<string, Rpc> = {
  StreamLogs: serverStream(streamLogs),
  UploadFile: unary(uploadFile),
  DownloadFile: unary(downloadFile),
};
