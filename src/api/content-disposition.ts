/**
 * The content-disposition of a download. The name goes as RFC 5987 `filename*` (UTF-8,
 * percent-encoded byte by byte, so any name fits a header), with an ASCII `filename` for
 * clients that know only that.
 */
export function attachmentDisposition(name: string): string {
  const base = name === '' ? 'download' : name;
  let encoded = '';
  for (const b of Buffer.from(base, 'utf8')) {
    const c = String.fromCharCode(b);
    encoded += /[A-Za-z0-9!#$&+\-.^_`|~]/.test(c) ? c : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  const ascii = base.replace(/[^\x20-\x7e]|["\\%]/g, '_');
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encoded}`;
}
