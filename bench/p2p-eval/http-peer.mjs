// Baseline transport: 1 MiB regions over plain HTTP range-style GETs between agents.
// argv: role(seed|leech) port target peersCsv [concurrency=4] [upLimit B/s, -1 none]
// Serves GET /have (bitfield of verified regions) and GET /r/N (region N, 404 if not held).
// A leecher fetches regions in random order; for each one picks a random peer whose last
// polled /have has it, else the origin (Range request); a peer miss/error falls back to the
// origin. Every region is checked against the per-region SHA-256 manifest and pwritten at its
// offset in the target file (a sparse file here; a block device would do the same).
import http from 'node:http'
import fs from 'node:fs'
import { createHash, randomInt } from 'node:crypto'
const [role, port, target, peersCsv = '', conc = '4', upLimit = '-1'] = process.argv.slice(2)
const ORIGIN = { host: '127.0.0.1', port: 18000, path: '/img.bin' }
const REGION = 1 << 20
const t0 = process.hrtime.bigint(); const c0 = process.cpuUsage()
const manifest = fs.readFileSync('data/img.sha256'); const N = manifest.length / 32
const size = fs.statSync('data/img.bin').size
const have = new Uint8Array(Math.ceil(N / 8))
const has = (bf, i) => (bf[i >> 3] >> (7 - (i & 7))) & 1
const set = (i) => { have[i >> 3] |= 1 << (7 - (i & 7)) }
let fd
if (role === 'seed') { fd = fs.openSync(target, 'r'); for (let i = 0; i < N; i++) set(i) } else { fd = fs.openSync(target, 'w+'); fs.ftruncateSync(fd, size) }
const agent = new http.Agent({ keepAlive: true, maxSockets: 8 })
const stats = { probes: [], from_origin: 0, from_peers: 0, served: 0, peer_misses: 0, bad: 0 }
// upload cap: token bucket as virtual clock, applied before sending each region
let nextFree = 0; const cap = Number(upLimit)
const delayFor = n => { if (cap <= 0) return 0; const now = Date.now(); nextFree = Math.max(nextFree, now) + n / cap * 1000; return nextFree - now }
http.createServer((req, res) => {
  if (req.url === '/have') return res.end(Buffer.from(have))
  const m = /^\/r\/(\d+)$/.exec(req.url)
  const i = m ? +m[1] : -1
  if (i < 0 || i >= N || !has(have, i)) { res.statusCode = 404; return res.end() }
  const len = Math.min(REGION, size - i * REGION); const buf = Buffer.allocUnsafe(len)
  fs.read(fd, buf, 0, len, i * REGION, (err) => {
    if (err) { res.statusCode = 500; return res.end() }
    setTimeout(() => { stats.served += len; res.writeHead(200, { 'content-length': len }); res.end(buf) }, delayFor(len))
  })
}).listen(+port, '127.0.0.1')
function get (opts) {
  return new Promise((resolve, reject) => {
    const req = http.get({ agent, timeout: 5000, ...opts }, (res) => {
      if (res.statusCode !== 200 && res.statusCode !== 206) { res.resume(); return resolve(null) }
      const chunks = []; res.on('data', c => chunks.push(c)); res.on('end', () => resolve(Buffer.concat(chunks))); res.on('error', reject)
    })
    req.on('timeout', () => req.destroy(new Error('timeout'))); req.on('error', reject)
  })
}
const peers = peersCsv.split(',').filter(Boolean).map(a => ({ host: a.split(':')[0], port: +a.split(':')[1], have: new Uint8Array(have.length) }))
let polling = true
async function poll () { while (polling) { await Promise.all(peers.map(async p => { try { const b = await get({ host: p.host, port: p.port, path: '/have' }); if (b) p.have = b } catch {} })); await new Promise(r => setTimeout(r, 200)) } }
async function fetchRegion (i) {
  const cands = peers.filter(p => has(p.have, i))
  let data = null
  if (cands.length) {
    const p = cands[randomInt(cands.length)]
    try { data = await get({ host: p.host, port: p.port, path: `/r/${i}` }) } catch {}
    if (data && !createHash('sha256').update(data).digest().equals(manifest.subarray(i * 32, i * 32 + 32))) { stats.bad++; data = null }
    if (data) stats.from_peers += data.length; else stats.peer_misses++
  }
  if (!data) {
    const s = i * REGION; const e = Math.min(size, s + REGION) - 1
    data = await get({ ...ORIGIN, headers: { range: `bytes=${s}-${e}` } })
    if (!createHash('sha256').update(data).digest().equals(manifest.subarray(i * 32, i * 32 + 32))) throw new Error('origin region bad')
    stats.from_origin += data.length
  }
  await new Promise((resolve, reject) => fs.write(fd, data, 0, data.length, i * REGION, e => e ? reject(e) : resolve()))
  set(i)
}
function report (event) { const c = process.cpuUsage(c0); return JSON.stringify({ event, role, port: +port, wall_s: Number(process.hrtime.bigint() - t0) / 1e9, cpu_s: (c.user + c.system) / 1e6, ...stats }) }
process.on('SIGTERM', () => { console.log(report('final')); process.exit(0) })
if (role === 'seed') console.log(report('ready'))
else {
  poll()
  const order = [...Array(N).keys()]; for (let k = N - 1; k > 0; k--) { const j = randomInt(k + 1); [order[k], order[j]] = [order[j], order[k]] }
  let next = 0; const claimed = new Uint8Array(N)
  await new Promise(r => setTimeout(r, 250)) // first poll of peers
  if (process.env.PROBE === '1') { // every second, a host read of a region not yet claimed: fetched at once, ahead of the background queue
    let k = 0
    const iv = setInterval(() => {
      if (next >= N || ++k > 8) return clearInterval(iv)
      const free = []; for (let i = 0; i < N; i++) if (!claimed[i]) free.push(i)
      if (!free.length) return
      const i = free[randomInt(free.length)]; claimed[i] = 1; const t = performance.now()
      fetchRegion(i).then(() => stats.probes.push({ region: i, ms: Math.round(performance.now() - t) }))
    }, 1000)
  }
  await Promise.all(Array.from({ length: +conc }, async () => { while (next < N) { const i = order[next++]; if (claimed[i]) continue; claimed[i] = 1; await fetchRegion(i) } }))
  console.log(report('done'))
}
