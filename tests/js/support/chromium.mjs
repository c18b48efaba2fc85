// Launches Debian's Chromium through playwright-core (never a downloaded
// browser); playwright gives each launch a fresh profile. A missing Chromium fails loudly: run scripts/setup.sh.
import { chromium } from "playwright-core";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";

const ARGS = [
  "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-quic",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

function ensureChromium() {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: run scripts/setup.sh (Debian package chromium)`);
}

export async function launch() {
  ensureChromium();
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS });
}

/**
 * A browser with a real (non-incognito) profile in a fresh temporary
 * directory, as a user's browser has: its Origin Private File System is on
 * disk. (Contexts of `launch()` are incognito, whose OPFS lives in the
 * browser process's memory and goes through IPC on every write.) Returns
 * the context; `close()` also removes the profile.
 */
export async function launchWithProfile(options = {}) {
  ensureChromium();
  const dir = mkdtempSync(join(tmpdir(), "handover-profile-"));
  const context = await chromium.launchPersistentContext(dir, { executablePath: CHROMIUM, headless: true, args: ARGS, ...options });
  const close = context.close.bind(context);
  context.close = async () => {
    await close();
    rmSync(dir, { recursive: true, force: true });
  };
  return context;
}
