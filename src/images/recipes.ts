/**
 * Template recipes. A template is a guest kernel + a root filesystem image with the agent inside.
 * Changing anything here (or in the files a recipe names) changes the template's content hash,
 * so the next start rebuilds it; an unchanged recipe is reused from the cache.
 */
export interface TemplateRecipe {
  name: string;
  description: string;
  suite: string;
  packages: string[];
  /** Virtual size of the machine's disk (the image is sparse). */
  diskSizeMb: number;
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
};

export function templateNames(): string[] {
  return Object.keys(templateRecipes);
}
