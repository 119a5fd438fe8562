#!/usr/bin/env node
// smartnic-nbd-relay: a fixed unix-socket path for a virtual bare-metal node's NVMe disk.
//
//   smartnic-nbd-relay.mjs --listen SOCKET --exports DIR [--mode 0660]
//
// The VM's QEMU is defined once with `-drive file=nbd:unix:SOCKET`, but the DPU agent
// exports each disk on <export_dir>/<disk id>.sock and the disk id changes with every
// deployment. Each connection to SOCKET is joined, byte for byte, to the one export
// socket in DIR at that moment (one agent per VM, so at most one disk). With none, or
// more than one, the connection is closed at once: QEMU then fails to start, as a host
// whose DPU presents no disk has nothing to boot. JSON lines on stdout say what happens.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    listen: { type: 'string' },
    exports: { type: 'string' },
    mode: { type: 'string', default: '0660' },
  },
});
if (!values.listen || !values.exports) {
  process.stderr.write('usage: smartnic-nbd-relay.mjs --listen SOCKET --exports DIR [--mode 0660]\n');
  process.exit(2);
}
const listenPath = values.listen;
const exportDir = values.exports;

function log(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ ts: new Date().toISOString(), event, ...fields })}\n`);
}

/** The export socket to join now, or an error message. */
function currentExport() {
  let names;
  try {
    names = fs.readdirSync(exportDir).filter((n) => n.endsWith('.sock'));
  } catch (err) {
    return { error: `cannot read ${exportDir}: ${err.message}` };
  }
  if (names.length !== 1) return { error: `${names.length} export sockets in ${exportDir} (need exactly 1)` };
  return { socket: path.join(exportDir, names[0]) };
}

const server = net.createServer((client) => {
  const found = currentExport();
  if (found.error) {
    log('refused', { reason: found.error });
    client.destroy();
    return;
  }
  const upstream = net.connect(found.socket);
  const close = (err) => {
    if (err) log('error', { socket: found.socket, message: err.message });
    client.destroy();
    upstream.destroy();
  };
  client.on('error', close).on('close', () => close());
  upstream.on('error', close).on('close', () => close());
  client.pipe(upstream);
  upstream.pipe(client);
  log('relay', { socket: found.socket });
});

fs.rmSync(listenPath, { force: true });
server.listen(listenPath, () => {
  fs.chmodSync(listenPath, Number.parseInt(values.mode, 8));
  log('listening', { socket: listenPath, exports: exportDir });
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    fs.rmSync(listenPath, { force: true });
    log('stopped');
    process.exit(0);
  });
}
