#!/usr/bin/env node
// Compiled by `npm run build` (run by `npm ci` through the root package's `prepare`).
import { existsSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { dirname, join } from 'node:path';

const cli = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'dist', 'driver', 'src', 'cli.js');
if (!existsSync(cli)) {
  process.stderr.write(`smartnic-driver: ${cli} is missing: run "npm run build" in the repository first\n`);
  process.exit(2);
}
const { main } = await import(pathToFileURL(cli).href);
process.exitCode = await main(process.argv.slice(2));
