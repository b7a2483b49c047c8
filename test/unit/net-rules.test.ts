import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { intToIp, ipToInt, outsideOf, slotsIn } from '../../src/net/addressing.js';
import { egressView, parseEgress } from '../../src/net/egress.js';
import { egressUpdate, hostRuleset, nsRuleset, resolverUpdate } from '../../src/net/firewall.js';
import { isAlwaysDenied } from '../../src/net/ranges.js';
import { SlotTable } from '../../src/net/slots.js';

const fw = {
  hostAddr: '10.213.0.5',
  nsAddr: '10.213.0.6',
  dnsPort: 5353,
  maxConnections: 64,
  bytesPerSecond: 1_000_000,
  hostAddrs: ['192.0.2.10'],
};

/** nft's own dry run (a transaction checked by the kernel, then aborted) in a throwaway namespace. */
function nftAccepts(script: string, setup = ''): void {
  const ns = `hutch-unit-${process.pid}`;
  execFileSync('ip', ['netns', 'add', ns]);
  try {
    if (setup) execFileSync('ip', ['netns', 'exec', ns, 'nft', '-f', '-'], { input: setup });
    execFileSync('ip', ['netns', 'exec', ns, 'nft', '-c', '-f', '-'], { input: script });
  } finally {
    execFileSync('ip', ['netns', 'del', ns]);
  }
}

describe('egress rules', () => {
  test('CIDRs, single addresses and names are told apart and normalised', () => {
    const r = parseEgress({
      allow: ['PyPI.org.', '*.pythonhosted.org', '10.1.2.3', '192.168.7.9/16'],
      deny: ['1.2.3.4/8'],
    });
    assert.deepEqual(r, {
      allowCidrs: ['10.1.2.3/32', '192.168.0.0/16'],
      allowDomains: ['pypi.org', '*.pythonhosted.org'],
      denyCidrs: ['1.0.0.0/8'],
      denyDomains: [],
    });
    assert.deepEqual(egressView(r).allow, [
      '10.1.2.3/32',
      '192.168.0.0/16',
      'pypi.org',
      '*.pythonhosted.org',
    ]);
  });

  test('anything else is INVALID_ARGUMENT naming the entry', () => {
    for (const bad of ['a b', '1.2.3.4/33', '::1', '2001:db8::/32', 'pypi.*.org', '-x.org', '', '1.2.3.4/']) {
      assert.throws(
        () => parseEgress({ allow: [bad] }),
        (e: { code?: string }) => e.code === 'INVALID_ARGUMENT',
        bad,
      );
    }
    assert.throws(() =>
      parseEgress({ deny: Array.from({ length: 1001 }, (_, i) => `10.0.${i >> 8}.${i & 255}`) }),
    );
  });
});

describe('addressing and ranges', () => {
  test('each slot is a /30 of the pool: host end .1, namespace end .2', () => {
    assert.deepEqual(outsideOf('10.213.0.0/16', 'ab12', 3), {
      slot: 3,
      host: '10.213.0.13',
      ns: '10.213.0.14',
      hostLink: 'hvab123',
    });
    assert.equal(slotsIn('10.213.0.0/16'), 16384);
    assert.ok(outsideOf('10.213.0.0/16', 'ffff', 16383).hostLink.length <= 15);
    assert.equal(intToIp(ipToInt('198.18.1.10')), '198.18.1.10');
  });

  test('always denied: private, loopback, link-local, CGNAT, multicast, IPv6; public is not', () => {
    for (const ip of [
      '10.0.0.1',
      '127.0.0.1',
      '169.254.169.254',
      '100.64.1.1',
      '172.16.5.5',
      '192.168.1.1',
      '224.0.0.1',
      '0.0.0.0',
      '::1',
      '2001:db8::1',
    ])
      assert.ok(isAlwaysDenied(ip), ip);
    for (const ip of ['1.1.1.1', '198.18.1.10', '8.8.8.8']) assert.ok(!isAlwaysDenied(ip), ip);
  });

  test('slots are taken once and released only by their owner', () => {
    const dir = mkdtempSync(join(tmpdir(), 'hutch-slots-'));
    try {
      const t = new SlotTable(dir, 4);
      const got = [t.take('a'), t.take('b'), t.take('c')].sort();
      assert.deepEqual(got, [1, 2, 3]);
      assert.throws(() => t.take('d'), /no free network slot/);
      t.release(got[0] as number, 'not-the-owner');
      assert.throws(() => t.take('d'));
      t.release(got[0] as number, t.ownerOf(got[0] as number) as string);
      assert.equal(t.take('d'), got[0]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('firewall rulesets are accepted by nft', () => {
  const rules = parseEgress({
    allow: ['198.51.100.0/24', '198.51.100.7', 'pypi.org'],
    deny: ['203.0.113.0/24'],
  });
  test('a namespace ruleset, open and with an allow list', () => {
    nftAccepts(nsRuleset(fw, parseEgress({})));
    nftAccepts(nsRuleset(fw, rules));
  });
  test('a live update and a resolver move apply over an existing ruleset', () => {
    nftAccepts(egressUpdate(fw, rules, true), nsRuleset(fw, parseEgress({})));
    nftAccepts(resolverUpdate({ ...fw, dnsPort: 6000 }, rules), nsRuleset(fw, rules));
  });
  test("the host's table, with and without an uplink", () => {
    nftAccepts(hostRuleset({ tag: 'ab12', pool: '10.213.0.0/16', dnsPort: 5353, uplink: '' }));
    nftAccepts(hostRuleset({ tag: 'ab12', pool: '10.213.0.0/16', dnsPort: 5353, uplink: 'eth0' }));
  });
});
