import { join } from 'node:path';
import { loadPackageDefinition, type ServiceDefinition } from '@grpc/grpc-js';
import { loadSync, type Options, type PackageDefinition } from '@grpc/proto-loader';
import { repoRoot } from '../../paths.js';

/**
 * The gRPC API's contract: spec/vm-api.proto, checked in byte for byte from the boxd spec and
 * loaded at run time (no generated code to drift from it). The options are the spec's Node
 * snippet's plus `oneofs`: field names as written, 64-bit integers as decimal strings (no
 * precision lost above 2^53), enums by name, every field present with its zero value.
 */
export const protoPath = join(repoRoot(), 'spec', 'vm-api.proto');

export const loaderOptions: Options = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

export const serviceName = 'boxd.api.v1.BoxdApi';

export interface BoxdProto {
  packageDefinition: PackageDefinition;
  service: ServiceDefinition;
}

export function loadBoxdProto(path = protoPath): BoxdProto {
  const packageDefinition = loadSync(path, loaderOptions);
  const pkg = loadPackageDefinition(packageDefinition) as unknown as {
    boxd: { api: { v1: { BoxdApi: { service: ServiceDefinition } } } };
  };
  return { packageDefinition, service: pkg.boxd.api.v1.BoxdApi.service };
}
