import { readFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';

/**
 * A real browser viewer for the VNC channel: noVNC (`@novnc/novnc`, its ES modules served as
 * they are) in headless Chromium (Debian's `chromium`, installed by scripts/setup.sh), driven
 * with puppeteer-core over a pipe. `renderNoVnc` connects to a `ws://…/v1/machines/{id}/vnc?token=…`
 * URL, waits for noVNC's `connect`, and reports what the canvas shows; `openNoVnc` keeps the
 * viewer open for input (clicks and keys go through noVNC, as a user's would).
 */

export const chromiumPath = '/usr/bin/chromium';

const here = dirname(fileURLToPath(import.meta.url));
/** The package's root (core/ imports ../vendor/pako), found from dist/test/helpers or test/helpers. */
async function novncRoot(): Promise<string> {
  for (const up of ['../../..', '../..']) {
    const root = join(here, up, 'node_modules', '@novnc', 'novnc');
    try {
      await readFile(join(root, 'core', 'rfb.js'));
      return root;
    } catch {
      // next
    }
  }
  throw new Error('@novnc/novnc is not installed (npm install)');
}

const page = `<!doctype html>
<html><head><meta charset="utf-8"><title>hutch noVNC harness</title>
<style>html,body{margin:0;background:#fff}#screen{width:1024px;height:768px}</style></head>
<body><div id="screen"></div>
<script>window.vnc = { state: 'loading', detail: '' };</script>
<script type="module">
import RFB from '/novnc/core/rfb.js';
const url = new URLSearchParams(location.search).get('ws');
window.vnc = { state: 'connecting', detail: '' };
const rfb = new RFB(document.getElementById('screen'), url, { shared: true });
rfb.scaleViewport = false;
rfb.addEventListener('connect', () => { window.vnc.state = 'connected'; });
rfb.addEventListener('disconnect', (e) => {
  window.vnc.state = 'disconnected';
  window.vnc.detail = e.detail.clean ? 'clean' : 'unclean';
});
rfb.addEventListener('securityfailure', (e) => { window.vnc.detail = 'security: ' + e.detail.reason; });
rfb.addEventListener('desktopname', (e) => { window.vnc.name = e.detail.name; });
window.rfb = rfb;
</script></body></html>`;

const types: Record<string, string> = { '.js': 'text/javascript', '.json': 'application/json' };

/** Serves the page and the noVNC package's core/ and vendor/ (nothing else) on 127.0.0.1. */
async function servePage(): Promise<{ url: string; server: Server }> {
  const root = await novncRoot();
  const server = createServer((req, res) => {
    const path = new URL(req.url ?? '/', 'http://x').pathname;
    if (path === '/') {
      res.writeHead(200, { 'content-type': 'text/html' }).end(page);
      return;
    }
    const rel = normalize(decodeURIComponent(path.replace(/^\/novnc\//, '')));
    if (!path.startsWith('/novnc/') || !/^(core|vendor)\//.test(rel) || rel.split(sep).includes('..')) {
      res.writeHead(404).end();
      return;
    }
    readFile(join(root, rel)).then(
      (b) => {
        const ext = rel.slice(rel.lastIndexOf('.'));
        res.writeHead(200, { 'content-type': types[ext] ?? 'application/octet-stream' }).end(b);
      },
      () => res.writeHead(404).end(),
    );
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/`, server };
}

export interface CanvasReport {
  width: number;
  height: number;
  /** Pixels that are not (near) black. */
  nonBlankPixels: number;
  /** Distinct colours (counted up to 4096). */
  colours: number;
}

export interface NoVncViewer {
  connected: boolean;
  /** noVNC's state ('connected', 'disconnected', 'connecting') and detail (clean/unclean, security …). */
  state(): Promise<{ state: string; detail: string; name?: string }>;
  canvas(): Promise<CanvasReport>;
  screenshot(): Promise<Buffer>;
  /** A click at framebuffer coordinates (noVNC sends the pointer events). */
  click(x: number, y: number): Promise<void>;
  /** Types text through noVNC's keyboard handling (key events to the VNC server). */
  type(text: string): Promise<void>;
  /** Presses one key by its DOM name (`Enter`, `Tab`, `a`). */
  press(key: string): Promise<void>;
  page: Page;
  close(): Promise<void>;
}

/**
 * Opens noVNC in headless Chromium on `wsUrl` and waits (up to `timeoutMs`) for its `connect`
 * and then for a first frame on the canvas. Always close the viewer (`after`/`finally`).
 */
export async function openNoVnc(wsUrl: string, opts: { timeoutMs?: number } = {}): Promise<NoVncViewer> {
  const timeout = opts.timeoutMs ?? 20_000;
  const site = await servePage();
  let browser: Browser | undefined;
  const close = async (): Promise<void> => {
    await browser?.close().catch(() => {});
    await new Promise<void>((r) => {
      site.server.close(() => r());
      site.server.closeAllConnections();
    });
  };
  try {
    browser = await puppeteer.launch({
      executablePath: chromiumPath,
      headless: true,
      pipe: true,
      // Chromium refuses to run as root with its sandbox on, and root is who runs the tests here
      // (CI, the dev machines): --no-sandbox. It only ever loads this harness page.
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--window-size=1100,850'],
      defaultViewport: { width: 1024, height: 768 },
    });
    const p = await browser.newPage();
    const pageErrors: string[] = [];
    p.on('pageerror', (e) => pageErrors.push(String((e as Error).message ?? e)));
    p.on('requestfailed', (r) => pageErrors.push(`${r.url()}: ${r.failure()?.errorText}`));
    const t0 = Date.now();
    const settled = (): Promise<unknown> =>
      p
        .waitForFunction(
          () =>
            !['loading', 'connecting'].includes((window as unknown as { vnc: { state: string } }).vnc.state),
          { timeout },
        )
        .catch(() => {});
    await p.goto(`${site.url}?ws=${encodeURIComponent(wsUrl)}`, { timeout });
    await settled();
    // noVNC's modules not run at all (a busy host, a module request lost): load the page once more.
    if ((await p.evaluate(() => (window as unknown as { vnc: { state: string } }).vnc.state)) === 'loading') {
      await p.reload({ timeout });
      await settled();
    }
    const loaded = await p.evaluate(() => (window as unknown as { vnc: { state: string } }).vnc.state);
    if (loaded === 'loading')
      throw new Error(`noVNC did not load: ${pageErrors.join('; ') || 'no page error'}`);
    const state = (): Promise<{ state: string; detail: string; name?: string }> =>
      p.evaluate(() => (window as unknown as { vnc: { state: string; detail: string; name?: string } }).vnc);
    const canvas = (): Promise<CanvasReport> =>
      p.evaluate(() => {
        const c = document.querySelector('#screen canvas') as HTMLCanvasElement | null;
        if (!c || c.width === 0 || c.height === 0)
          return { width: 0, height: 0, nonBlankPixels: 0, colours: 0 };
        const d = (c.getContext('2d') as CanvasRenderingContext2D).getImageData(0, 0, c.width, c.height).data;
        let nonBlank = 0;
        const colours = new Set<number>();
        for (let i = 0; i < d.length; i += 4) {
          const r = d[i] ?? 0;
          const g = d[i + 1] ?? 0;
          const b = d[i + 2] ?? 0;
          if (r > 16 || g > 16 || b > 16) nonBlank++;
          if (colours.size < 4096) colours.add((r << 16) | (g << 8) | b);
        }
        return { width: c.width, height: c.height, nonBlankPixels: nonBlank, colours: colours.size };
      });
    const connected = (await state()).state === 'connected';
    // The first FramebufferUpdate follows the connect: wait a little for it to be drawn.
    if (connected)
      while (Date.now() - t0 < timeout && (await canvas()).nonBlankPixels === 0)
        await new Promise((r) => setTimeout(r, 100));
    const at = async (x: number, y: number): Promise<{ x: number; y: number }> => {
      const box = await p.$eval('#screen canvas', (c) => {
        const r = c.getBoundingClientRect();
        return { left: r.left, top: r.top };
      });
      return { x: box.left + x, y: box.top + y };
    };
    return {
      connected,
      state,
      canvas,
      screenshot: async () => Buffer.from(await p.screenshot({ type: 'png' })),
      click: async (x, y) => {
        const q = await at(x, y);
        await p.mouse.click(q.x, q.y);
      },
      type: async (text) => {
        await p.focus('#screen canvas');
        await p.keyboard.type(text, { delay: 20 });
      },
      press: async (key) => {
        await p.focus('#screen canvas');
        await p.keyboard.press(key as Parameters<Page['keyboard']['press']>[0]);
      },
      page: p,
      close,
    };
  } catch (e) {
    await close();
    throw e;
  }
}

/** Connects noVNC to `wsUrl`, renders, reports, closes. */
export async function renderNoVnc(
  wsUrl: string,
  opts: { timeoutMs?: number } = {},
): Promise<{
  connected: boolean;
  pagePng: Buffer;
  canvas: CanvasReport;
}> {
  const v = await openNoVnc(wsUrl, opts);
  try {
    return { connected: v.connected, pagePng: await v.screenshot(), canvas: await v.canvas() };
  } finally {
    await v.close();
  }
}
