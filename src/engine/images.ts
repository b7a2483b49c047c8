import type { TemplateManifest } from '../images/builder.js';

/** A bootable image for boxes: a kernel and root disk like a template's, plus the OCI config. */
export interface BootImage extends TemplateManifest {
  ref: string;
  digest: string;
  env: string[];
  workdir: string | null;
}

/** Turns an image reference into a bootable image (pulling or building it; cached). */
export interface ImageResolver {
  resolve(ref: string): Promise<BootImage>;
}
