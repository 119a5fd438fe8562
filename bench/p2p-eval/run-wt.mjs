// Coordinator: origin + (optional) 1 seeder + N WebTorrent leechers on loopback; waits for every
// leecher's 'done', then collects counters and origin stats. argv: nLeech seeder(1|0) [originRate B/s] [upLimit] [strategy]
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import readline from 'node:readline'
const [nL = '4', withSeed = '1', originRate = '0', upLimit = '-1', strategy = 'rarest', webseed = '1'] = process.argv.slice(2)
const run = `run/wt-${Date.now()}`; fs.mkdirSync(run, { recursive: true })
const procs = []
function start (args, name) {
  const flags = process.env.PEER_NODE_FLAGS && args[0] !== 'origin.mjs' ? process.env.PEER_NODE_FLAGS.split(' ') : []
  const p = spawn(process.execPath, [...flags, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }); procs.push(p)
  p.stderr.on('data', d => process.stderr.write(`[${name}] ${d}`))
  p.lines = readline.createInterface({ input: p.stdout }); return p
}
const origin = start(['origin.mjs', '18000', 'data/img.bin', originRate], 'origin')
await new Promise(r => setTimeout(r, 300))
const base = 19000; const ports = []
if (withSeed === '1') ports.push(base)
for (let i = 1; i <= +nL; i++) ports.push(base + i)
const addrs = ports.map(p => `127.0.0.1:${p}`)
const T0 = Date.now(); const results = []; const finals = []
if (withSeed === '1') { fs.mkdirSync(`${run}/seed`, { recursive: true }); fs.linkSync('data/img.bin', `${run}/seed/img.bin`) }
const ready = withSeed === '1' ? new Promise(r => { const s = start(['wt-node.mjs', 'seed', String(base), `${run}/seed`, '', '1', upLimit, strategy], 'seed'); s.lines.on('line', l => { const j = JSON.parse(l); if (j.event === 'ready') r(j); else finals.push(j) }) }) : null
if (ready) console.error('seed ready', JSON.stringify(await ready))
const Tstart = Date.now()
const done = []
for (let i = 1; i <= +nL; i++) {
  const port = base + i
  const others = addrs.filter(a => !a.endsWith(`:${port}`) && (+a.split(':')[1] < port)).join(',') // connect to lower ports only: one connection per pair
  const p = start(['wt-node.mjs', 'leech', String(port), `${run}/l${i}`, others, webseed, upLimit, strategy], `l${i}`)
  done.push(new Promise(r => p.lines.on('line', l => { const j = JSON.parse(l); if (j.event === 'done') { j.t_since_start = (Date.now() - Tstart) / 1000; results.push(j); r() } else finals.push(j) })))
}
const timeout = setTimeout(() => { console.error('TIMEOUT'); for (const p of procs) p.kill('SIGKILL'); process.exit(3) }, 180000)
await Promise.all(done)
clearTimeout(timeout)
const all_done_s = (Date.now() - Tstart) / 1000
const ost = await (await fetch('http://127.0.0.1:18000/stats')).json()
for (const p of procs.slice(1)) p.kill('SIGTERM')
await new Promise(r => setTimeout(r, 1500))
origin.kill('SIGTERM'); clearTimeout(timeout)
const GiB = 1 << 30
const out = { engine: 'webtorrent', webseed: webseed === '1', leechers: +nL, seeder: withSeed === '1', strategy, originRate: +originRate, all_done_s, origin: ost,
  origin_bytes_per_image: ost.bytes / (256 << 20),
  leechers_detail: results.map(r => ({ probes: r.probes, port: r.port, t: r.t_since_start, cpu_s: r.cpu_s, recv: r.torrent_received, by_type: r.downloaded_by_wire_type, cpu_s_per_GiB: r.cpu_s / (r.torrent_received / GiB) })),
  finals }
// verify leecher outputs are byte-identical to the image
const { execSync } = await import('node:child_process')
out.cmp_ok = results.every((r, i) => { try { execSync(`cmp -s data/img.bin ${run}/l${r.port - base}/img.bin`); return true } catch { return false } })
console.log(JSON.stringify(out))
fs.rmSync(run, { recursive: true, force: true })
process.exit(0)
