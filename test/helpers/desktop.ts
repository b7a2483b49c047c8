import { api, startDaemon, type TestDaemon, waitFor } from './daemon.js';

/**
 * A test daemon that serves the desktop template, once the desktop's snapshot is ready (taken
 * at start: a cold boot of the desktop, ~30 s under TCG, then cached in the shared image dir),
 * so desktops in the test restore from it like a user's would.
 */
export async function startDesktopDaemon(env: Record<string, string> = {}): Promise<TestDaemon> {
  const d = await startDaemon({ env: { HUTCH_TEMPLATES: 'python,desktop', ...env } });
  await waitFor(
    'the desktop snapshot',
    async () => {
      const h = await api(d.url, 'GET', '/healthz');
      const s = (h.body.snapshots as Record<string, string> | undefined)?.desktop;
      if (s === 'failed') throw new Error(`the desktop snapshot failed: ${d.log().slice(-3000)}`);
      return s === 'ready' ? true : undefined;
    },
    300_000,
  );
  return d;
}
