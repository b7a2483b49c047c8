import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { compileDomainRules, DomainRuleError, normalizeDomain } from '../../src/net/dns/domain-rules.js';

describe('dns domain rules', () => {
  it('matches exact names case-insensitively, trailing dot ignored', () => {
    const r = compileDomainRules(['pypi.org', 'Files.PythonHosted.org.']);
    for (const n of ['pypi.org', 'PyPI.org', 'pypi.org.', 'files.pythonhosted.org'])
      assert.ok(r.matches(n), n);
    for (const n of ['www.pypi.org', 'pypi.org.evil.com', 'xpypi.org', 'org', 'pythonhosted.org']) {
      assert.ok(!r.matches(n), n);
    }
  });

  it('a wildcard matches any depth below, never the apex', () => {
    const r = compileDomainRules(['*.pypi.org']);
    for (const n of ['www.pypi.org', 'a.b.c.PYPI.org', 'x.pypi.org.']) assert.ok(r.matches(n), n);
    for (const n of ['pypi.org', 'xpypi.org', 'pypi.org.evil.com', 'www.pypi.org.evil.com', 'evilpypi.org']) {
      assert.ok(!r.matches(n), n);
    }
  });

  it('exact plus wildcard covers both', () => {
    const r = compileDomainRules(['pypi.org', '*.pypi.org']);
    assert.ok(r.matches('pypi.org'));
    assert.ok(r.matches('a.pypi.org'));
    assert.equal(r.size, 2);
  });

  it('refuses rules that are not names', () => {
    for (const bad of [
      '',
      '*',
      '*.',
      '**.a.com',
      'a.*.com',
      'a..com',
      '.a.com',
      'a b.com',
      '-a.com',
      'a'.repeat(64),
    ]) {
      assert.throws(() => compileDomainRules([bad]), DomainRuleError, JSON.stringify(bad));
    }
  });

  it('normalizes names', () => {
    assert.equal(normalizeDomain('WWW.Example.ORG.'), 'www.example.org');
    assert.equal(normalizeDomain('_imap._tcp.example.org'), '_imap._tcp.example.org');
    assert.equal(normalizeDomain(''), null);
    assert.equal(normalizeDomain('a..b'), null);
    assert.equal(normalizeDomain('a\u0000b'), null);
  });

  it('costs the same with 1,000 rules as with 10 (one probe per label)', () => {
    const small = compileDomainRules(Array.from({ length: 10 }, (_, i) => `*.site${i}.example.com`));
    const big = compileDomainRules(Array.from({ length: 1000 }, (_, i) => `*.site${i}.example.com`));
    const names = Array.from({ length: 1000 }, (_, i) => `a.b.c.host${i}.other.example.net`);
    const time = (r: typeof small): number => {
      let best = Number.POSITIVE_INFINITY;
      for (let run = 0; run < 5; run++) {
        const t = performance.now();
        for (let k = 0; k < 20; k++) for (const n of names) r.matches(n);
        best = Math.min(best, performance.now() - t);
      }
      return best;
    };
    time(small);
    const ratio = time(big) / time(small);
    // Linear in rules would be ~100x; allow generous noise on a shared machine.
    assert.ok(ratio < 3, `1,000 rules cost ${ratio.toFixed(2)}x 10 rules`);
  });
});
