/**
 * An S3-compatible server for the tests, in a process of its own (so a test can kill it for
 * real, mid-transfer): s3rver on 127.0.0.1, objects under argv[2], bucket argv[3], port
 * argv[4] (0: any). Prints "listening <port>" once it serves.
 */
import S3rver from 's3rver';

const [dir, bucket, port] = process.argv.slice(2);
const server = new S3rver({
  address: '127.0.0.1',
  port: Number(port ?? 0),
  silent: true,
  directory: dir as string,
  configureBuckets: [{ name: bucket as string, configs: [] }],
});
const { port: bound } = (await server.run()) as { port: number };
process.stdout.write(`listening ${bound}\n`);
process.on('SIGTERM', () => {
  server.close().finally(() => process.exit(0));
});
