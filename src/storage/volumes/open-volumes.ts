import { mkdirSync } from 'node:fs';
import type { Log } from '../../background.js';
import type { Config } from '../../config.js';
import type { BlobStore } from './blob-store.js';
import { LocalStore } from './local-store.js';
import { S3Store } from './s3-store.js';
import { VolumeService, volumeTtl } from './volume-service.js';

/** The store the configuration names (HUTCH_VOLUME_BACKEND): a local directory or an S3 bucket. */
export function openVolumeStore(config: Config): BlobStore {
  if (config.volumeBackend === 's3')
    return new S3Store({
      endpoint: config.s3Endpoint,
      bucket: config.s3Bucket ?? '',
      region: config.s3Region,
      accessKeyId: config.s3AccessKeyId,
      secretAccessKey: config.s3SecretAccessKey,
      forcePathStyle: config.s3ForcePathStyle,
      prefix: `${config.s3Prefix}volumes/`,
      maxAttempts: config.s3MaxAttempts,
      partBytes: config.s3PartBytes,
      timeoutMs: config.s3TimeoutMs,
    });
  mkdirSync(config.volumeDir, { recursive: true, mode: 0o700 });
  return new LocalStore(config.volumeDir);
}

/** The daemon's volumes: the configured store, limits and collector (start() begins collecting). */
export function openVolumes(config: Config, log: Log): VolumeService {
  return new VolumeService(
    openVolumeStore(config),
    {
      maxBytes: config.volumeMaxBytes,
      maxFiles: config.volumeMaxFiles,
      maxPerUser: config.volumeMaxPerUser,
      ttlDefaultSeconds: volumeTtl.default,
      ttlMinSeconds: volumeTtl.min,
      ttlMaxSeconds: volumeTtl.max,
    },
    { intervalMs: config.volumeGcIntervalMs, graceMs: config.volumeGcGraceMs },
    log,
  );
}
