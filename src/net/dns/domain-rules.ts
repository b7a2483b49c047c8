/**
 * Domain rules: `pypi.org` matches that name only, `*.pypi.org` any name below it at any depth
 * but not `pypi.org` itself (list both to get both). Matching is case-insensitive and ignores a
 * trailing dot. A lookup costs one hash probe per label of the name asked, whatever the number
 * of rules, since guests ask for every connection they open.
 */

const LABEL = /^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/;

/** Lowercase, without the trailing dot; null when it is not a usable host name. */
export function normalizeDomain(name: string): string | null {
  let n = name.toLowerCase();
  if (n.endsWith('.')) n = n.slice(0, -1);
  if (n.length === 0 || n.length > 253) return null;
  for (const l of n.split('.')) if (!LABEL.test(l)) return null;
  return n;
}

export class DomainRuleError extends Error {
  override name = 'DomainRuleError';
}

export class DomainRules {
  private readonly exact = new Set<string>();
  /** `*.pypi.org` is stored as `pypi.org`: a name matches if one of its proper suffixes is here. */
  private readonly below = new Set<string>();

  /** Throws DomainRuleError naming the first rule that is neither a name nor `*.` + a name. */
  constructor(rules: readonly string[]) {
    for (const rule of rules) {
      const wildcard = rule.startsWith('*.');
      const n = normalizeDomain(wildcard ? rule.slice(2) : rule);
      if (n === null) throw new DomainRuleError(`not a domain rule: ${JSON.stringify(rule)}`);
      (wildcard ? this.below : this.exact).add(n);
    }
  }

  get size(): number {
    return this.exact.size + this.below.size;
  }

  matches(name: string): boolean {
    let n = name.toLowerCase();
    if (n.endsWith('.')) n = n.slice(0, -1);
    if (this.exact.has(n)) return true;
    if (this.below.size === 0) return false;
    for (let dot = n.indexOf('.'); dot >= 0; dot = n.indexOf('.', dot + 1)) {
      if (this.below.has(n.slice(dot + 1))) return true;
    }
    return false;
  }
}

export function compileDomainRules(rules: readonly string[]): DomainRules {
  return new DomainRules(rules);
}
