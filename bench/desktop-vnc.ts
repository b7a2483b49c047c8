/**
 * VNC through the WebSocket bridge vs directly on QEMU's Unix socket: FramebufferUpdates per
 * second and bytes per second, one request outstanding at a time (as noVNC does), raw encoding
 * (the most bytes per frame: what stresses a bridge). Each figure is the median of N runs of
 * `--seconds` each, direct and bridged alternating, in one process.
 *
 * Without env: a bare QEMU (microvm, virtio-gpu, `-vnc unix:…,share=force-shared`, no guest),
 * whose screen never changes, so every request is a full one (incremental=0); the bridged side
 * is the real machines-API server with the real route (test/helpers/vnc.ts `startVncApi`).
 * Against a real desktop:
 *   HUTCH_BENCH_VNC_SOCK=<run dir>/vnc.sock     the direct baseline, and the bridged side through
 *                                               an in-process API server to it, unless:
 *   HUTCH_BENCH_VNC_URL=http://127.0.0.1:8080   a running daemon's base URL, with
 *   HUTCH_BENCH_VNC_MACHINE=<id> HUTCH_BENCH_VNC_TOKEN=<JWT (optional on loopback)>
 *   HUTCH_BENCH_VNC_INCREMENTAL=1               incremental requests (a changing screen's rate)
 *
 *   npm run bench:vnc [-- --runs 5 --seconds 3]
 */
import { parseArgs } from 'node:util';
import {
  type BareVnc,
  connectRfb,
  openUnix,
  RfbClient,
  socketLink,
  startBareVnc,
  startSyntheticRfb,
  startVncApi,
  type VncApi,
} from '../test/helpers/vnc.js';
import { median } from './bench-lib.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '5' }, seconds: { type: 'string', default: '3' } },
});
const runs = Number(values.runs);
const seconds = Number(values.seconds);
const env = process.env;
const incremental = env.HUTCH_BENCH_VNC_INCREMENTAL === '1';

interface Run {
  fps: number;
  bytesPerSecond: number;
}

/** Keeps one FramebufferUpdateRequest outstanding for `seconds`; counts what comes back. */
async function measure(rfb: RfbClient): Promise<Run> {
  await rfb.handshake();
  // The first update is always full: not part of the figure.
  const first = rfb.nextUpdate();
  rfb.request(false);
  await first;
  const frames0 = rfb.updates;
  const bytes0 = rfb.updateBytes;
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  while (performance.now() < end) {
    const next = rfb.nextUpdate(30_000);
    rfb.request(incremental);
    await next;
  }
  const dt = (performance.now() - t0) / 1000;
  rfb.close();
  return { fps: (rfb.updates - frames0) / dt, bytesPerSecond: (rfb.updateBytes - bytes0) / dt };
}

async function compare(label: string, sock: string | undefined, wsUrl: string | undefined): Promise<void> {
  const direct: Run[] = [];
  const bridged: Run[] = [];
  for (let i = 0; i < runs; i++) {
    if (sock) direct.push(await measure(new RfbClient(socketLink(await openUnix(sock)))));
    if (wsUrl) bridged.push(await measure(await connectRfb(wsUrl)));
  }
  const fps = (rs: Run[]): number[] => rs.map((r) => r.fps);
  const mibs = (rs: Run[]): number[] => rs.map((r) => r.bytesPerSecond / (1024 * 1024));
  if (direct.length) {
    line(`${label}: updates/s, direct on the Unix socket`, fps(direct), '/s');
    line(`${label}: MiB/s, direct on the Unix socket`, mibs(direct), 'MiB/s');
  }
  if (bridged.length) {
    const base = direct.length ? direct : undefined;
    line(`${label}: updates/s, WebSocket route + bridge`, fps(bridged), '/s', base && fps(base));
    line(`${label}: MiB/s, WebSocket route + bridge`, mibs(bridged), 'MiB/s', base && mibs(base));
  }
}

function line(name: string, xs: number[], unit: string, base?: number[]): void {
  const ratio = base ? ` (${(median(xs) / median(base)).toFixed(2)}× direct)` : '';
  console.log(`${name.padEnd(52)} median=${median(xs).toFixed(1)} ${unit} n=${xs.length}${ratio}`);
}

async function main(): Promise<void> {
  let qemu: BareVnc | undefined;
  let api: VncApi | undefined;
  try {
    let sock = env.HUTCH_BENCH_VNC_SOCK;
    let wsUrl: string | undefined;
    if (env.HUTCH_BENCH_VNC_URL && env.HUTCH_BENCH_VNC_MACHINE) {
      const base = env.HUTCH_BENCH_VNC_URL.replace(/\/$/, '').replace(/^http/, 'ws');
      const token = env.HUTCH_BENCH_VNC_TOKEN
        ? `?token=${encodeURIComponent(env.HUTCH_BENCH_VNC_TOKEN)}`
        : '';
      wsUrl = `${base}/v1/machines/${encodeURIComponent(env.HUTCH_BENCH_VNC_MACHINE)}/vnc${token}`;
    }
    if (!sock && !wsUrl) {
      qemu = await startBareVnc();
      sock = qemu.sock;
    }
    if (!wsUrl && sock) {
      api = await startVncApi(sock);
      wsUrl = api.wsUrl;
    }
    const what = qemu ? 'bare QEMU 7.2, 640x480x32, raw' : `${wsUrl}${sock ? ` / ${sock}` : ''}`;
    console.log(
      `VNC bench: ${what}; ${incremental ? 'incremental' : 'full (incremental=0)'} requests, ${runs} runs of ${seconds} s`,
    );
    await compare(qemu ? 'QEMU' : 'VNC', sock, wsUrl);
    if (qemu) {
      // The bridge's ceiling: an RFB server that never waits for a refresh timer.
      const synth = await startSyntheticRfb();
      const synthApi = await startVncApi(synth.sock);
      try {
        console.log('synthetic RFB server: 1024x768x32 raw, answers each request at once');
        await compare('synthetic', synth.sock, synthApi.wsUrl);
      } finally {
        await synthApi.close();
        await synth.close();
      }
    }
  } finally {
    await api?.close();
    await qemu?.stop();
  }
}

await main();
