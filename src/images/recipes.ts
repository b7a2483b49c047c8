/**
 * Template recipes. A template is a guest kernel + a root filesystem image with the agent inside.
 * Changing anything here (or in the files a recipe names) changes the template's content hash,
 * so the next start rebuilds it; an unchanged recipe is reused from the cache.
 */
/** A Debian root filesystem tree: mmdebstrap minbase of `suite` plus `packages`. */
export interface RootfsSpec {
  suite: string;
  packages: string[];
}

export interface TemplateRecipe extends RootfsSpec {
  name: string;
  description: string;
  /** Virtual size of the machine's disk (the image is sparse). */
  diskSizeMb: number;
  /** The machines' size when the template needs one of its own; absent: the server's defaults. */
  vcpus?: number;
  memoryMb?: number;
  /**
   * Its machines have a screen (virtio-gpu, keyboard, tablet; VNC and screenshots from the host)
   * and start images/desktop/ after every cold boot: the snapshot is taken with the desktop up.
   */
  display?: true;
  /** Files of this repository copied into the image (`source` relative to the repository). */
  files?: { source: string; guest: string; mode: number }[];
  /** Run after every cold boot (snapshots included), before the machine is handed out. */
  startup?: string[];
}

/** The size of a template's machines: what its recipe declares, else the server's defaults. */
export function templateSize(
  name: string,
  defaults: { vcpus: number; memoryMb: number },
): { vcpus: number; memoryMb: number } {
  const r = templateRecipes[name];
  return { vcpus: r?.vcpus ?? defaults.vcpus, memoryMb: r?.memoryMb ?? defaults.memoryMb };
}

export const templateRecipes: Record<string, TemplateRecipe> = {
  python: {
    name: 'python',
    description: 'Headless Debian 12 shell: python3 + pip, node, bash, coreutils',
    suite: 'bookworm',
    packages: [
      'python3',
      'python3-pip',
      'python3-venv',
      'nodejs',
      'bash',
      'coreutils',
      'procps',
      'ca-certificates',
      'iproute2',
      'less',
    ],
    diskSizeMb: 2048,
  },
  desktop: {
    name: 'desktop',
    description:
      'Debian 12 desktop: Xorg on the virtual GPU, openbox, xterm, Firefox ESR, xdotool, python3; VNC, screenshots and input from the host',
    suite: 'bookworm',
    packages: [
      'xserver-xorg-core',
      'xserver-xorg-input-evdev',
      'x11-xserver-utils',
      'x11-utils',
      'xdotool',
      'wmctrl',
      'xclip',
      'openbox',
      'xterm',
      'firefox-esr',
      'fonts-dejavu-core',
      'python3',
      'python3-pip',
      'bash',
      'coreutils',
      'procps',
      'ca-certificates',
      'curl',
      'iproute2',
      'less',
    ],
    diskSizeMb: 4096,
    vcpus: 2,
    memoryMb: 1024,
    display: true,
    files: [{ source: 'images/desktop/hutch-desktop', guest: 'usr/local/sbin/hutch-desktop', mode: 0o755 }],
    startup: ['/usr/local/sbin/hutch-desktop'],
  },
};

export function templateNames(): string[] {
  return Object.keys(templateRecipes);
}

/** An OCI image name hutch builds offline from Debian packages instead of pulling it. */
export interface LocalImageRecipe extends RootfsSpec {
  description: string;
  /** The image config's Env, as Debian's own images set it. */
  env: string[];
}

const debianBookworm: LocalImageRecipe = {
  description: 'Debian 12 (bookworm) minbase with bash, coreutils, procps and ca-certificates',
  suite: 'bookworm',
  packages: ['bash', 'coreutils', 'procps', 'ca-certificates'],
  env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
};

/**
 * Local images by canonical reference. They are served from here whatever registry access the
 * host has (Docker Hub is not needed for them); one recipe behind several names is built once.
 */
export const localImageRecipes: Record<string, LocalImageRecipe> = {
  'docker.io/library/debian:bookworm': debianBookworm,
  'docker.io/library/debian:12': debianBookworm,
  'docker.io/library/debian:bookworm-slim': debianBookworm,
  'docker.io/library/debian:latest': debianBookworm,
};
