// Build a v1 .torrent (1 MiB pieces = our region size, private, BEP 19 url-list = origin) for
// data/img.bin, and a per-region SHA-256 manifest; time both (CPU and wall).
import createTorrent from 'create-torrent'
import parseTorrent from 'parse-torrent'
import { createHash } from 'node:crypto'
import fs from 'node:fs'
const file = process.argv[2] || 'data/img.bin'
const origin = process.argv[3] || 'http://127.0.0.1:18000/img.bin'
const REGION = 1 << 20
function t0 () { return { w: process.hrtime.bigint(), c: process.cpuUsage() } }
function el (s) { const c = process.cpuUsage(s.c); return { wall_s: Number(process.hrtime.bigint() - s.w) / 1e9, cpu_s: (c.user + c.system) / 1e6 } }

let s = t0()
const buf = await new Promise((resolve, reject) => createTorrent(file, { name: 'img.bin', pieceLength: REGION, private: true, urlList: [origin], announceList: [], createdBy: 'wt-eval' }, (e, b) => e ? reject(e) : resolve(b)))
const tor = el(s)
fs.writeFileSync('data/img.torrent', buf)
const parsed = await parseTorrent(buf)
console.log(JSON.stringify({ step: 'create-torrent (SHA-1, 1 MiB pieces)', ...tor, torrent_bytes: buf.length, pieces: parsed.pieces.length, infoHash: parsed.infoHash, urlList: parsed.urlList, private: parsed.private }))

s = t0()
const fd = fs.openSync(file, 'r'); const size = fs.fstatSync(fd).size; const out = []
const b = Buffer.allocUnsafe(REGION)
for (let off = 0; off < size; off += REGION) { const n = fs.readSync(fd, b, 0, REGION, off); out.push(createHash('sha256').update(b.subarray(0, n)).digest()) }
fs.writeFileSync('data/img.sha256', Buffer.concat(out))
console.log(JSON.stringify({ step: 'per-region SHA-256 manifest (plain, sync)', ...el(s), regions: out.length }))
s = t0()
for (let off = 0; off < size; off += REGION) { const n = fs.readSync(fd, b, 0, REGION, off); createHash('sha1').update(b.subarray(0, n)).digest() }
console.log(JSON.stringify({ step: 'per-region SHA-1 (plain, sync) for comparison', ...el(s) }))
