import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { crop, decodePng, encodePng, parsePpm, pngSize, scaleDown } from '../../src/desktop/png.js';
import { charKey, comboKeys, inputSteps, type QmpInputEvent } from '../../src/desktop/qmp-input.js';
import { HutchError } from '../../src/errors.js';

const ctx = () => ({ width: 1024, height: 768, cursor: { x: 0, y: 0 } });
const events = (actions: unknown[]): QmpInputEvent[] => inputSteps(actions, ctx()).flatMap((s) => s.events);
const keys = (evs: QmpInputEvent[]): string[] =>
  evs.flatMap((e) => (e.type === 'key' ? [`${e.data.down ? '+' : '-'}${e.data.key.data}`] : []));

describe('desktop input: actions as QMP events', () => {
  test("a pixel is its centre on the tablet's 0..32767 axes, which the guest maps back to that pixel", () => {
    for (const [x, y] of [
      [0, 0],
      [613, 407],
      [1023, 767],
    ] as const) {
      const [ax, ay] = events([{ type: 'move', x, y }]) as Extract<QmpInputEvent, { type: 'abs' }>[];
      assert.ok(ax && ay);
      // What the guest computes: value * size / 32768, rounded down.
      assert.equal(Math.floor((ax.data.value * 1024) / 32768), x);
      assert.equal(Math.floor((ay.data.value * 768) / 32768), y);
      assert.ok(ax.data.value <= 32767);
    }
  });

  test('xdotool key names and combinations: modifiers pressed first, released last', () => {
    assert.deepEqual(comboKeys('ctrl+shift+t'), ['ctrl', 'shift', 't']);
    assert.deepEqual(comboKeys('Return'), ['ret']);
    assert.deepEqual(comboKeys('super+Page_Down'), ['meta_l', 'pgdn']);
    assert.deepEqual(comboKeys('ctrl++'), ['ctrl', 'shift', 'equal']);
    assert.deepEqual(keys(events([{ type: 'key', keys: 'ctrl+a Delete' }])), [
      '+ctrl',
      '+a',
      '-a',
      '-ctrl',
      '+delete',
      '-delete',
    ]);
  });

  test('text on a US layout: shift for capitals and symbols, newline is Return', () => {
    assert.deepEqual(charKey('A'), { qcode: 'a', shift: true });
    assert.deepEqual(charKey('>'), { qcode: 'dot', shift: true });
    assert.deepEqual(charKey('\n'), { qcode: 'ret', shift: false });
    assert.deepEqual(keys(events([{ type: 'type', text: 'a!' }])), [
      '+a',
      '-a',
      '+shift',
      '+1',
      '-1',
      '-shift',
    ]);
  });

  test('clicks, drags and scrolls', () => {
    const evs = events([{ type: 'click', x: 5, y: 5, button: 'right', count: 2 }]);
    assert.deepEqual(
      evs
        .filter((e) => e.type === 'btn')
        .map((e) => (e.type === 'btn' ? `${e.data.button}${e.data.down ? '↓' : '↑'}` : '')),
      ['right↓', 'right↑', 'right↓', 'right↑'],
    );
    const wheel = events([{ type: 'scroll', direction: 'down', amount: 2 }]).filter((e) => e.type === 'btn');
    assert.equal(wheel.length, 4);
    const c = ctx();
    inputSteps([{ type: 'down', x: 10, y: 10 }, { type: 'move', x: 200, y: 100 }, { type: 'up' }], c);
    assert.deepEqual(c.cursor, { x: 200, y: 100 });
  });

  test('anything wrong anywhere in the batch: INVALID_ARGUMENT before any event is made', () => {
    for (const bad of [
      [],
      [{ type: 'move', x: 1024, y: 0 }],
      [{ type: 'click', x: 1.5, y: 2 }],
      [{ type: 'key', keys: 'hyper+q' }],
      [{ type: 'type', text: 'é' }],
      [{ type: 'type', text: 'x'.repeat(4097) }],
      [{ type: 'wait', ms: 10_001 }],
      [{ type: 'scroll', direction: 'in' }],
      [{ type: 'click', count: 4 }],
      [{ type: 'nope' }],
      [{ type: 'move', x: 1, y: 1 }, null],
    ])
      assert.throws(
        () => inputSteps(bad, ctx()),
        (e: unknown) => e instanceof HutchError && e.code === 'INVALID_ARGUMENT',
        JSON.stringify(bad),
      );
  });
});

describe('desktop images: PNG, PPM, scaling and cropping', () => {
  const img = (w: number, h: number) => {
    const rgb = Buffer.alloc(w * h * 3);
    for (let i = 0; i < w * h; i++) rgb.set([i % 256, (i * 7) % 256, (i * 13) % 256], i * 3);
    return { width: w, height: h, rgb };
  };

  test('encode then decode gives the same pixels; the size is read from the header', () => {
    const a = img(37, 21);
    const png = encodePng(a);
    assert.deepEqual(pngSize(png), { width: 37, height: 21 });
    assert.ok(decodePng(png).rgb.equals(a.rgb));
  });

  test('PPM as QEMU writes it', () => {
    const a = img(4, 3);
    const ppm = Buffer.concat([Buffer.from('P6\n4 3\n255\n'), a.rgb]);
    assert.ok(parsePpm(ppm).rgb.equals(a.rgb));
    assert.throws(() => parsePpm(Buffer.from('P6\n4 3\n255\nabc')), /truncated/);
  });

  test('scaling averages areas; cropping takes exactly the rectangle', () => {
    const flat = {
      width: 4,
      height: 2,
      rgb: Buffer.from([
        0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255,
      ]),
    };
    const half = scaleDown(flat, 2, 1);
    assert.deepEqual([...half.rgb], [128, 128, 128, 128, 128, 128]);
    const a = img(10, 10);
    const c = crop(a, { x: 2, y: 3, width: 4, height: 2 });
    assert.equal(c.rgb.length, 4 * 2 * 3);
    assert.deepEqual([...c.rgb.subarray(0, 3)], [...a.rgb.subarray((3 * 10 + 2) * 3, (3 * 10 + 2) * 3 + 3)]);
  });
});
