import { createRequire } from 'node:module';
import type { PackageDefinition } from '@grpc/proto-loader';

type Descriptor = typeof import('protobufjs/ext/descriptor/index.js');
// CommonJS only; the same module @grpc/reflection decodes the descriptors with.
const descriptor = createRequire(import.meta.url)('protobufjs/ext/descriptor') as Descriptor;

interface MessageDesc {
  field?: { name?: string; oneofIndex?: number; proto3Optional?: boolean }[];
  oneofDecl?: { name?: string }[];
  nestedType?: MessageDesc[];
  reservedRange?: { start?: number; end?: number }[];
}

/**
 * The file descriptors proto-loader makes (through protobufjs) differ from protoc's in two ways
 * that strict reflection clients refuse: a message's reserved ranges carry an inclusive end
 * where descriptor.proto's `end` is exclusive (`reserved 3;` comes out as 3..3, an empty range,
 * which Go's protodesc rejects: `buf curl` then cannot find the service at all), and proto3
 * `optional` fields lose `proto3_optional`. This returns the package definition with fixed
 * descriptors, for the reflection service only; messages are still encoded by proto-loader.
 */
export function reflectableDefinition(def: PackageDefinition): PackageDefinition {
  const fixed = new Map<string, Buffer>();
  const fix = (bin: Buffer): Buffer => {
    const key = bin.toString('base64');
    let out = fixed.get(key);
    if (!out) {
      const file = descriptor.FileDescriptorProto.decode(bin) as unknown as { messageType?: MessageDesc[] };
      for (const m of file.messageType ?? []) fixMessage(m);
      out = Buffer.from(descriptor.FileDescriptorProto.encode(file as never).finish());
      fixed.set(key, out);
    }
    return out;
  };
  const copy: PackageDefinition = {};
  for (const [name, entry] of Object.entries(def)) {
    const protos = (entry as { fileDescriptorProtos?: Buffer[] }).fileDescriptorProtos;
    copy[name] = Array.isArray(protos)
      ? ({ ...entry, fileDescriptorProtos: protos.map(fix) } as never)
      : entry;
  }
  return copy;
}

function fixMessage(m: MessageDesc): void {
  // protobufjs 7 writes every range's end inclusive (test/unit/grpc-contract checks the result).
  for (const r of m.reservedRange ?? []) if (r.end !== undefined) r.end += 1;
  for (const f of m.field ?? []) {
    const oneof = f.oneofIndex === undefined ? undefined : m.oneofDecl?.[f.oneofIndex];
    if (oneof?.name === `_${f.name}`) f.proto3Optional = true;
  }
  for (const n of m.nestedType ?? []) fixMessage(n);
}
