/** The `dpu-agent` command: dispatches to subcommands; errors carry their DPU_ERR_* code. */
import { readFileSync } from 'node:fs';
import { DpuError } from '../../image-access/src/errors.js';

// Subcommands are imported when they run: `stream` on a DPU should not carry the daemon's
// HTTP server and schema validator in memory (measured: ~10 MiB of RSS).
const stream = (): Promise<typeof import('./cli/stream.js')> => import('./cli/stream.js');
const manifest = (): Promise<typeof import('./cli/manifest.js')> => import('./cli/manifest.js');
const serve = (): Promise<typeof import('./daemon/serve.js')> => import('./daemon/serve.js');

const HELP = `Usage: dpu-agent <command> [options]

Commands:
  stream    Serve one streaming disk over NBD in the foreground (see: dpu-agent stream --help)
  manifest  Read an image once and write its per-region manifest (see: dpu-agent manifest --help)
  serve     Run the agent daemon: management API, many disks, resumed on restart (see: dpu-agent serve --help)

Options:
  --help     Show this help
  --version  Show the version

Errors are printed as "dpu-agent: DPU_ERR_CODE: message"; docs/errors.md says what each code means.
`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'stream':
        return await (await stream()).runStream(rest);
      case 'manifest':
        return await (await manifest()).runManifest(rest);
      case 'serve':
        return await (await serve()).runServe(rest);
      case undefined:
      case '--help':
      case '-h':
      case 'help':
        process.stdout.write(rest[0] === 'stream' ? (await stream()).streamHelp() : rest[0] === 'serve' ? (await serve()).serveHelp() : rest[0] === 'manifest' ? (await manifest()).manifestHelp() : HELP);
        return command === undefined ? 2 : 0;
      case '--version':
        process.stdout.write(`${version()}\n`);
        return 0;
      default:
        process.stderr.write(`dpu-agent: unknown command "${command}"\n\n${HELP}`);
        return 2;
    }
  } catch (err) {
    if (err instanceof DpuError) {
      process.stderr.write(`dpu-agent: ${err.code}: ${err.message}\n`);
      return err.code === 'DPU_ERR_CONFIG' ? 2 : 1;
    }
    process.stderr.write(`dpu-agent: ${(err as Error).stack ?? String(err)}\n`);
    return 1;
  }
}

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../../dpu-agent/package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}
