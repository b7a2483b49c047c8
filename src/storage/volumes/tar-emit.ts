import tar from 'tar-stream';
import type { Entry } from './manifest.js';
import type { SegmentReader } from './segment-reader.js';

const typeBits = { file: 0o100000, dir: 0o040000, symlink: 0o120000 } as const;

/**
 * A version of a volume as a tar stream (GNU tar reads it; names longer than ustar allows go in
 * PAX headers): entries in manifest order (every directory before what it holds), files with
 * their bytes from the segments, numeric owners, modes with setuid/setgid/sticky, mtimes,
 * symlinks with their targets as they are. `sink` takes each piece and resolves when it may
 * send more (the guest's stdin window), so memory stays bounded whatever the volume's size.
 */
export async function emitTar(
  entries: Entry[],
  reader: SegmentReader,
  sink: (chunk: Buffer) => Promise<void>,
): Promise<void> {
  const pack = tar.pack();
  const produced = (async () => {
    try {
      for (const e of entries) {
        const header: Parameters<tar.Pack['entry']>[0] = {
          name: e.path,
          // With the file-type bits: tar-stream would replace a mode of 0 with its default, and
          // the encoder keeps only the low 12 bits anyway.
          mode: e.mode | typeBits[e.type],
          uid: e.uid,
          gid: e.gid,
          mtime: new Date(e.mtime * 1000),
          type: e.type === 'dir' ? 'directory' : e.type,
          size: e.type === 'file' ? e.size : 0,
          ...(e.type === 'symlink' ? { linkname: e.target ?? '' } : {}),
        };
        await new Promise<void>((resolve, reject) => {
          const w = pack.entry(header, (err) => (err ? reject(err) : resolve()));
          if (e.type !== 'file' || e.size === 0 || !e.seg) {
            if (e.type === 'file') w.end(undefined);
            return;
          }
          const seg = e.seg;
          (async () => {
            for await (const b of reader.read(seg, e.off, e.size))
              if (!w.write(b))
                await new Promise<void>((r) => {
                  const go = (): void => {
                    w.off('drain', go);
                    w.off('close', go);
                    r();
                  };
                  w.on('drain', go);
                  w.on('close', go);
                });
            w.end(undefined);
          })().catch((err: unknown) => {
            w.destroy(err as Error);
            reject(err);
          });
        });
      }
      pack.finalize();
    } catch (e) {
      pack.destroy(e as Error);
      throw e;
    }
  })();
  produced.catch(() => {});
  for await (const chunk of pack as AsyncIterable<Buffer>) await sink(chunk);
  await produced;
}
