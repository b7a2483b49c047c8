import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { createOverlay, virtualSize } from '../../src/vmm/disk.js';

describe('disk overlays', () => {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-disk-'));
  const base = join(dir, 'base.raw');
  writeFileSync(base, '');
  truncateSync(base, 64 * 2 ** 20);
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('without a size the overlay is the base size', async () => {
    await createOverlay(base, join(dir, 'same.qcow2'), 'raw');
    assert.equal(await virtualSize(join(dir, 'same.qcow2'), 'qcow2'), 64 * 2 ** 20);
  });

  test('a size makes the virtual disk larger (whole MiB, rounded up)', async () => {
    await createOverlay(base, join(dir, 'big.qcow2'), 'raw', undefined, 4 * 2 ** 30);
    assert.equal(await virtualSize(join(dir, 'big.qcow2'), 'qcow2'), 4 * 2 ** 30);
    await createOverlay(base, join(dir, 'odd.qcow2'), 'raw', undefined, 100 * 2 ** 20 + 1);
    assert.equal(await virtualSize(join(dir, 'odd.qcow2'), 'qcow2'), 101 * 2 ** 20);
    // an overlay of an overlay: the size of a qcow2 base counts
    await createOverlay(join(dir, 'big.qcow2'), join(dir, 'big2.qcow2'), 'qcow2');
    assert.equal(await virtualSize(join(dir, 'big2.qcow2'), 'qcow2'), 4 * 2 ** 30);
  });

  test('smaller than the base, or not a byte count, is an error', async () => {
    await assert.rejects(
      createOverlay(base, join(dir, 'small.qcow2'), 'raw', undefined, 32 * 2 ** 20),
      /smaller/,
    );
    await assert.rejects(createOverlay(base, join(dir, 'neg.qcow2'), 'raw', undefined, -1), /positive/);
    await assert.rejects(createOverlay(base, join(dir, 'frac.qcow2'), 'raw', undefined, 1.5), /positive/);
  });
});
