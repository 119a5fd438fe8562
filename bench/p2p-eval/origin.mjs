// Origin (stands in for Swift/Glance): serves one file with single HTTP Range requests,
// counts requests and bytes served; GET /stats returns the counters. Optional total rate
// cap in bytes/s (argv[4], 0 = none) shared across all responses.
import http from 'node:http'
import fs from 'node:fs'
const [port = '18000', file = 'data/img.bin', rate = '0'] = process.argv.slice(2)
const size = fs.statSync(file).size
const fd = fs.openSync(file, 'r')
const stats = { requests: 0, bytes: 0, ranges: 0 }
const cap = Number(rate)
let nextFree = 0 // token bucket as a virtual clock
function delayFor (n) { if (!cap) return 0; const now = Date.now(); nextFree = Math.max(nextFree, now) + n / cap * 1000; return nextFree - now }
http.createServer((req, res) => {
  if (req.url === '/stats') { res.setHeader('content-type', 'application/json'); return res.end(JSON.stringify(stats)) }
  if (req.url === '/reset') { stats.requests = stats.bytes = stats.ranges = 0; return res.end('ok') }
  stats.requests++
  let start = 0; let end = size - 1
  const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range || '')
  if (m) { start = +m[1]; end = m[2] ? Math.min(+m[2], size - 1) : size - 1; stats.ranges++ }
  if (start > end) { res.statusCode = 416; return res.end() }
  const len = end - start + 1
  const buf = Buffer.allocUnsafe(len)
  fs.read(fd, buf, 0, len, start, (err) => {
    if (err) { res.statusCode = 500; return res.end() }
    setTimeout(() => {
      stats.bytes += len
      res.writeHead(m ? 206 : 200, { 'content-length': len, 'accept-ranges': 'bytes', ...(m ? { 'content-range': `bytes ${start}-${end}/${size}` } : {}) })
      res.end(buf)
    }, delayFor(len))
  })
}).listen(+port, '127.0.0.1', () => console.error(`origin on ${port}`))
