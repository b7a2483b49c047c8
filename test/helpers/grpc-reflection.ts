import { createRequire } from 'node:module';
import * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';

/** protobufjs's descriptor extension (CommonJS; loading it also adds Root.fromDescriptor). */
const descriptor = createRequire(import.meta.url)(
  'protobufjs/ext/descriptor',
) as typeof import('protobufjs/ext/descriptor/index.js');

/**
 * A client that knows nothing of the proto: it asks the server's reflection service
 * (grpc.reflection.v1) for the file that defines a symbol, builds the service from the
 * descriptors with protobufjs, and calls methods by name. What `grpcurl` does without a proto.
 */
const reflectionProto = `
syntax = "proto3";
package r;
message Req { string host = 1; string file_by_filename = 3; string file_containing_symbol = 4; string list_services = 7; }
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ServiceResponse { string name = 1; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ErrorResponse { int32 error_code = 1; string error_message = 2; }
message Res {
  string valid_host = 1;
  FileDescriptorResponse file_descriptor_response = 4;
  ListServiceResponse list_services_response = 6;
  ErrorResponse error_response = 7;
}`;

interface Res {
  file_descriptor_response?: { file_descriptor_proto: Uint8Array[] };
  list_services_response?: { service: { name: string }[] };
  error_response?: { error_code: number; error_message: string };
}

export interface Reflected {
  services: string[];
  root: protobuf.Root;
  call(method: string, req: Record<string, unknown>, token: string): Promise<Record<string, unknown>>;
  close(): void;
}

/** `v1alpha` is what older tools (grpcurl before 1.9) ask; the server answers both. */
export async function reflect(
  address: string,
  symbol: string,
  version: 'v1' | 'v1alpha' = 'v1',
): Promise<Reflected> {
  const r = protobuf.parse(reflectionProto, { keepCase: true }).root;
  const Req = r.lookupType('r.Req');
  const ResT = r.lookupType('r.Res');
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  const call = client.makeBidiStreamRequest(
    `/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`,
    (m: Record<string, unknown>) => Buffer.from(Req.encode(Req.create(m)).finish()),
    (b: Buffer) => ResT.toObject(ResT.decode(b)) as Res,
  );
  const answers: Res[] = [];
  const done = new Promise<void>((resolve, reject) => {
    call.on('data', (m: Res) => answers.push(m));
    call.on('end', () => resolve());
    call.on('error', reject);
  });
  call.write({ list_services: '' });
  call.write({ file_containing_symbol: symbol });
  call.end();
  await done;
  const err = answers.find((a) => a.error_response)?.error_response;
  if (err) throw new Error(`reflection: ${err.error_message}`);
  const services = answers.flatMap((a) => a.list_services_response?.service.map((s) => s.name) ?? []);
  const files = answers.flatMap((a) => a.file_descriptor_response?.file_descriptor_proto ?? []);
  const set = descriptor.FileDescriptorSet.create({
    file: files.map((f) => descriptor.FileDescriptorProto.decode(f)),
  });
  const root = (protobuf.Root as unknown as { fromDescriptor(s: unknown): protobuf.Root }).fromDescriptor(
    set,
  );
  const service = root.lookupService(symbol);
  return {
    services,
    root,
    call: (method, req, token) => {
      const m = service.methods[method];
      if (!m) return Promise.reject(new Error(`no method ${method} in the reflected service`));
      const reqT = root.lookupType(m.requestType);
      const resT = root.lookupType(m.responseType);
      const meta = new grpc.Metadata();
      meta.set('authorization', `Bearer ${token}`);
      return new Promise((resolve, reject) =>
        client.makeUnaryRequest(
          `/${symbol}/${method}`,
          (x: Record<string, unknown>) => Buffer.from(reqT.encode(reqT.fromObject(x)).finish()),
          (b: Buffer) => resT.toObject(resT.decode(b), { longs: String, defaults: true }),
          req,
          meta,
          (e, v) => (e ? reject(e) : resolve(v as Record<string, unknown>)),
        ),
      );
    },
    close: () => client.close(),
  };
}
