// One WebTorrent peer. argv: role(seed|leech) port dir peersCsv [webseed:1|0] [uploadLimitBytesPerSec|-1]
// No tracker, no DHT, no LSD, no PEX-from-outside: peers are given (127.0.0.1:port list).
// Prints one JSON line when its download completes (leech) or when ready (seed), then keeps
// serving until SIGTERM, when it prints its final counters.
import WebTorrent from 'webtorrent'
import fs from 'node:fs'
import parseTorrent from 'parse-torrent'
const [role, port, dir, peersCsv = '', webseed = '1', upLimit = '-1', strategy = 'rarest'] = process.argv.slice(2)
const t0 = process.hrtime.bigint(); const c0 = process.cpuUsage()
const torrentBuf = await parseTorrent(fs.readFileSync('data/img.torrent'))
if (webseed !== '1') torrentBuf.urlList = [] // no BEP 19 web seed
const client = new WebTorrent({ dht: false, tracker: false, lsd: false, utPex: false, natUpnp: false, natPmp: false, utp: false, torrentPort: +port, uploadLimit: +upLimit })
client.on('error', e => { console.error(role, port, 'client error', e.message); process.exit(2) })
const byType = {}
const wires = new Set()
fs.mkdirSync(dir, { recursive: true })
const torrent = client.add(torrentBuf, { path: dir, skipVerify: role === 'seed', strategy })
torrent.on('wire', (w) => wires.add(w))
torrent.on('warning', e => console.error(port, 'warning', e.message))
torrent.on('error', e => { console.error(port, 'torrent error', e.message); process.exit(2) })
function counters () {
  const d = {}; const u = {}
  for (const w of wires) { const k = w.type || 'unknown'; d[k] = (d[k] || 0) + w.downloaded; u[k] = (u[k] || 0) + w.uploaded }
  const c = process.cpuUsage(c0)
  return { probes, role, port: +port, wall_s: Number(process.hrtime.bigint() - t0) / 1e9, cpu_s: (c.user + c.system) / 1e6, downloaded_by_wire_type: d, uploaded_by_wire_type: u, torrent_downloaded: torrent.downloaded, torrent_received: torrent.received, uploaded: torrent.uploaded, wires: wires.size }
}
torrent.on('ready', () => {
  for (const p of peersCsv.split(',').filter(Boolean)) torrent.addPeer(p)
  if (role === 'seed') console.log(JSON.stringify({ event: 'ready', ...counters(), done: torrent.done }))
})
// PROBE=1: every second from t=1 s, ask for one region we do not have yet as a host read would
// (torrent.critical + a high-priority select) and time how long until it is verified.
const probes = []
if (process.env.PROBE === '1') torrent.on('ready', () => {
  let k = 0
  const iv = setInterval(() => {
    if (torrent.done || ++k > 8) return clearInterval(iv)
    const missing = []; for (let i = 0; i < torrent.pieces.length; i++) if (!torrent.bitfield.get(i)) missing.push(i)
    const i = missing[Math.floor(Math.random() * missing.length)]; const t = performance.now()
    torrent.critical(i, i); torrent.select(i, i, 100)
    const on = (j) => { if (j === i) { probes.push({ piece: i, ms: Math.round(performance.now() - t) }); torrent.off('verified', on) } }
    torrent.on('verified', on)
  }, 1000)
})
torrent.on('done', () => { if (role === 'leech') console.log(JSON.stringify({ event: 'done', ...counters() })) })
process.on('SIGTERM', () => { console.log(JSON.stringify({ event: 'final', ...counters() })); client.destroy(() => process.exit(0)); setTimeout(() => process.exit(0), 2000).unref() })
