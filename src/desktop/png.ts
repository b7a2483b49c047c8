import { deflateSync, inflateSync } from 'node:zlib';

/**
 * Just enough PNG for screenshots: QEMU writes the screen as PPM (raw RGB) or PNG; scaling needs
 * the pixels, and nothing in the image pipeline needs more than 8-bit RGB(A) without interlace.
 */
export interface RgbImage {
  width: number;
  height: number;
  /** 3 bytes per pixel, rows top to bottom. */
  rgb: Buffer;
}

const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

const crcTable = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(parts: Buffer[]): number {
  let c = 0xffffffff;
  for (const b of parts)
    for (let i = 0; i < b.length; i++) c = (crcTable[(c ^ (b[i] ?? 0)) & 0xff] ?? 0) ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const t = Buffer.from(type, 'latin1');
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32([t, data]));
  return Buffer.concat([len, t, data, crc]);
}

/** An 8-bit RGB PNG. Filter "up" on every row: screens are mostly flat areas, which it zeroes. */
export function encodePng(img: RgbImage): Buffer {
  const { width, height, rgb } = img;
  const stride = width * 3;
  const raw = Buffer.alloc((stride + 1) * height);
  for (let y = 0; y < height; y++) {
    const out = y * (stride + 1);
    raw[out] = y === 0 ? 0 : 2;
    const row = y * stride;
    if (y === 0) rgb.copy(raw, out + 1, row, row + stride);
    else
      for (let i = 0; i < stride; i++)
        raw[out + 1 + i] = ((rgb[row + i] ?? 0) - (rgb[row - stride + i] ?? 0)) & 0xff;
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // truecolour
  return Buffer.concat([
    signature,
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(raw, { level: 6 })),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

/** The size a PNG says it is (its IHDR), without decoding it. */
export function pngSize(png: Buffer): { width: number; height: number } {
  if (png.length < 24 || !png.subarray(0, 8).equals(signature) || png.toString('latin1', 12, 16) !== 'IHDR')
    throw new Error('not a PNG');
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

/** Decodes an 8-bit RGB or RGBA, non-interlaced PNG to RGB (alpha dropped). */
export function decodePng(png: Buffer): RgbImage {
  const { width, height } = pngSize(png);
  const depth = png[24];
  const colour = png[25];
  const interlace = png[28];
  if (depth !== 8 || (colour !== 2 && colour !== 6) || interlace !== 0)
    throw new Error(`unsupported PNG (depth ${depth}, colour type ${colour}, interlace ${interlace})`);
  const bpp = colour === 6 ? 4 : 3;
  const idat: Buffer[] = [];
  for (let off = 8; off + 8 <= png.length; ) {
    const len = png.readUInt32BE(off);
    const type = png.toString('latin1', off + 4, off + 8);
    if (type === 'IDAT') idat.push(png.subarray(off + 8, off + 8 + len));
    if (type === 'IEND') break;
    off += 12 + len;
  }
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * bpp;
  const cur = Buffer.alloc(stride);
  let prev = Buffer.alloc(stride);
  const rgb = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    const base = y * (stride + 1);
    const filter = raw[base];
    for (let i = 0; i < stride; i++) {
      const x = raw[base + 1 + i] ?? 0;
      const a = i >= bpp ? (cur[i - bpp] ?? 0) : 0;
      const b = prev[i] ?? 0;
      const c = i >= bpp ? (prev[i - bpp] ?? 0) : 0;
      let v: number;
      if (filter === 0) v = x;
      else if (filter === 1) v = x + a;
      else if (filter === 2) v = x + b;
      else if (filter === 3) v = x + ((a + b) >> 1);
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a);
        const pb = Math.abs(p - b);
        const pc = Math.abs(p - c);
        v = x + (pa <= pb && pa <= pc ? a : pb <= pc ? b : c);
      } else throw new Error(`bad PNG filter ${filter}`);
      cur[i] = v & 0xff;
    }
    for (let px = 0; px < width; px++) cur.copy(rgb, (y * width + px) * 3, px * bpp, px * bpp + 3);
    prev = Buffer.from(cur);
  }
  return { width, height, rgb };
}

/** A binary PPM (P6, maxval 255), as QEMU's screendump writes it. */
export function parsePpm(ppm: Buffer): RgbImage {
  // Header: P6, width, height, maxval, separated by whitespace, then one whitespace byte.
  let off = 0;
  const fields: string[] = [];
  while (fields.length < 4) {
    while (off < ppm.length && /\s/.test(String.fromCharCode(ppm[off] ?? 0))) off++;
    if (ppm[off] === 0x23) {
      while (off < ppm.length && ppm[off] !== 0x0a) off++;
      continue;
    }
    const start = off;
    while (off < ppm.length && !/\s/.test(String.fromCharCode(ppm[off] ?? 0))) off++;
    fields.push(ppm.toString('latin1', start, off));
  }
  const [magic, w, h, max] = fields;
  const width = Number(w);
  const height = Number(h);
  if (magic !== 'P6' || max !== '255' || !(width > 0) || !(height > 0))
    throw new Error('not an 8-bit P6 PPM');
  const rgb = ppm.subarray(off + 1, off + 1 + width * height * 3);
  if (rgb.length !== width * height * 3) throw new Error('truncated PPM');
  return { width, height, rgb };
}

/** The part of an image inside a rectangle (which must lie within it). */
export function crop(img: RgbImage, r: { x: number; y: number; width: number; height: number }): RgbImage {
  const out = Buffer.alloc(r.width * r.height * 3);
  for (let y = 0; y < r.height; y++) {
    const from = ((r.y + y) * img.width + r.x) * 3;
    img.rgb.copy(out, y * r.width * 3, from, from + r.width * 3);
  }
  return { width: r.width, height: r.height, rgb: out };
}

/** Scales down by averaging each destination pixel's source area (legible text, no aliasing). */
export function scaleDown(img: RgbImage, width: number, height: number): RgbImage {
  if (width >= img.width && height >= img.height) return img;
  const out = Buffer.alloc(width * height * 3);
  const sx = img.width / width;
  const sy = img.height / height;
  for (let y = 0; y < height; y++) {
    const y0 = Math.floor(y * sy);
    const y1 = Math.max(y0 + 1, Math.floor((y + 1) * sy));
    for (let x = 0; x < width; x++) {
      const x0 = Math.floor(x * sx);
      const x1 = Math.max(x0 + 1, Math.floor((x + 1) * sx));
      let r = 0;
      let g = 0;
      let b = 0;
      for (let yy = y0; yy < y1; yy++)
        for (let xx = x0; xx < x1; xx++) {
          const i = (yy * img.width + xx) * 3;
          r += img.rgb[i] ?? 0;
          g += img.rgb[i + 1] ?? 0;
          b += img.rgb[i + 2] ?? 0;
        }
      const n = (y1 - y0) * (x1 - x0);
      const o = (y * width + x) * 3;
      out[o] = Math.round(r / n);
      out[o + 1] = Math.round(g / n);
      out[o + 2] = Math.round(b / n);
    }
  }
  return { width, height, rgb: out };
}
