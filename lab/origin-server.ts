/**
 * An image origin as a program (the lab runs it inside its emulated link's namespace):
 * serves one file with Range support and prints {"event":"listening","url"} on stdout.
 *   node dist/lab/origin-server.js --file IMAGE --host 10.213.0.2 [--port 8080]
 */
import { parseArgs } from 'node:util';
import { TestOrigin } from '../tests/helpers/origin.js';

const { values } = parseArgs({ options: { file: { type: 'string' }, host: { type: 'string', default: '127.0.0.1' }, port: { type: 'string', default: '0' } } });
if (!values.file) {
  process.stderr.write('origin-server: --file IMAGE is required\n');
  process.exit(2);
}
const origin = new TestOrigin({ file: values.file });
const url = await origin.start(values.host, Number(values.port));
process.stdout.write(JSON.stringify({ event: 'listening', url }) + '\n');
const stop = (): void => {
  void origin.stop().then(() => process.exit(0));
};
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
