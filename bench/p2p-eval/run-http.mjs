// Coordinator for the HTTP-regions baseline: origin + optional seeder + N leechers, all on loopback.
// argv: nLeech seeder(1|0) [originRate B/s] [upLimit] [concurrency]
import { spawn, execSync } from 'node:child_process'
import fs from 'node:fs'
import readline from 'node:readline'
const [nL = '4', withSeed = '1', originRate = '0', upLimit = '-1', conc = '4'] = process.argv.slice(2)
const run = `run/http-${Date.now()}`; fs.mkdirSync(run, { recursive: true })
const procs = []
function start (args, name) {
  const p = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] }); procs.push(p)
  p.stderr.on('data', d => process.stderr.write(`[${name}] ${d}`))
  p.lines = readline.createInterface({ input: p.stdout }); return p
}
const origin = start(['origin.mjs', '18000', 'data/img.bin', originRate], 'origin')
await new Promise(r => setTimeout(r, 300))
const base = 20000; const ports = []
if (withSeed === '1') ports.push(base)
for (let i = 1; i <= +nL; i++) ports.push(base + i)
const finals = []
if (withSeed === '1') await new Promise(r => { const s = start(['http-peer.mjs', 'seed', String(base), 'data/img.bin', '', conc, upLimit], 'seed'); s.lines.on('line', l => { const j = JSON.parse(l); if (j.event === 'ready') r(); else finals.push(j) }) })
const Tstart = Date.now(); const results = []; const done = []
for (let i = 1; i <= +nL; i++) {
  const port = base + i
  const others = ports.filter(p => p !== port).map(p => `127.0.0.1:${p}`).join(',')
  const p = start(['http-peer.mjs', 'leech', String(port), `${run}/l${i}.img`, others, conc, upLimit], `l${i}`)
  done.push(new Promise(r => p.lines.on('line', l => { const j = JSON.parse(l); if (j.event === 'done') { j.t_since_start = (Date.now() - Tstart) / 1000; results.push(j); r() } else finals.push(j) })))
}
const timeout = setTimeout(() => { console.error('TIMEOUT'); for (const p of procs) p.kill('SIGKILL'); process.exit(3) }, 180000)
await Promise.all(done); clearTimeout(timeout)
const all_done_s = (Date.now() - Tstart) / 1000
const ost = await (await fetch('http://127.0.0.1:18000/stats')).json()
for (const p of procs.slice(1)) p.kill('SIGTERM')
await new Promise(r => setTimeout(r, 800)); origin.kill('SIGTERM')
const GiB = 1 << 30
const out = { engine: 'http-regions', leechers: +nL, seeder: withSeed === '1', originRate: +originRate, concurrency: +conc, all_done_s, origin: ost, origin_bytes_per_image: ost.bytes / (256 << 20),
  leechers_detail: results.map(r => ({ probes: r.probes, port: r.port, t: r.t_since_start, cpu_s: r.cpu_s, from_origin: r.from_origin, from_peers: r.from_peers, peer_misses: r.peer_misses, bad: r.bad, cpu_s_per_GiB: r.cpu_s / ((r.from_origin + r.from_peers) / GiB) })), finals }
out.cmp_ok = results.every(r => { try { execSync(`cmp -s data/img.bin ${run}/l${r.port - base}.img`); return true } catch { return false } })
console.log(JSON.stringify(out))
fs.rmSync(run, { recursive: true, force: true }); process.exit(0)
