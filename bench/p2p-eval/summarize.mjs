// Medians per scenario and engine from results.jsonl (or argv[2]).
import fs from 'node:fs'
const rows = fs.readFileSync(process.argv[2] || 'results.jsonl', 'utf8').trim().split('\n').filter(Boolean).map(l => JSON.parse(l))
const med = a => { const s = [...a].sort((x, y) => x - y); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2 }
const groups = {}
for (const r of rows) (groups[`${r.scenario} | ${r.engine}`] ??= []).push(r)
for (const [k, rs] of Object.entries(groups)) {
  const L = rs.flatMap(r => r.leechers_detail)
  const peerBytes = L.map(l => l.from_peers ?? ((l.by_type.tcpIncoming || 0) + (l.by_type.tcpOutgoing || 0) + (l.by_type.utpIncoming || 0) + (l.by_type.utpOutgoing || 0)))
  const originBytesL = L.map(l => l.from_origin ?? (l.by_type.webSeed || 0))
  const seedFinal = rs.flatMap(r => r.finals.filter(f => f.role === 'seed'))
  console.log(`${k}  (n=${rs.length} runs, all cmp ok: ${rs.every(r => r.cmp_ok)})`)
  console.log(`  all leechers done, s: median ${med(rs.map(r => r.all_done_s)).toFixed(2)}  [${rs.map(r => r.all_done_s.toFixed(1)).join(', ')}]`)
  console.log(`  origin bytes / image (all leechers together): median ${med(rs.map(r => r.origin_bytes_per_image)).toFixed(2)}  [${rs.map(r => r.origin_bytes_per_image.toFixed(2)).join(', ')}]; origin requests median ${med(rs.map(r => r.origin.requests))}`)
  console.log(`  per leecher: from origin ${(med(originBytesL) / 2 ** 20).toFixed(0)} MiB, from peers ${(med(peerBytes) / 2 ** 20).toFixed(0)} MiB (medians)`)
  console.log(`  leecher CPU s per GiB received: median ${med(L.map(l => l.cpu_s_per_GiB)).toFixed(1)}  (min ${Math.min(...L.map(l => l.cpu_s_per_GiB)).toFixed(1)}, max ${Math.max(...L.map(l => l.cpu_s_per_GiB)).toFixed(1)}); leecher CPU s median ${med(L.map(l => l.cpu_s)).toFixed(2)}`)
  if (seedFinal.length) console.log(`  seeder CPU s (whole run) median ${med(seedFinal.map(f => f.cpu_s)).toFixed(2)}, uploaded MiB median ${(med(seedFinal.map(f => f.uploaded ?? f.served)) / 2 ** 20).toFixed(0)}`)
  const probes = L.flatMap(l => l.probes || [])
  if (probes.length) console.log(`  on-demand region latency ms: median ${med(probes.map(p => p.ms))}, max ${Math.max(...probes.map(p => p.ms))}, n=${probes.length}`)
}
