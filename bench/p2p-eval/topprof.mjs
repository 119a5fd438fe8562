// Self-time by function and by package for a .cpuprofile (argv[2]).
import fs from 'node:fs'
const p = JSON.parse(fs.readFileSync(process.argv[2]))
const self = new Map(); const byId = new Map(p.nodes.map(n => [n.id, n]))
const dt = {}; for (let i = 0; i < p.samples.length; i++) dt[p.samples[i]] = (dt[p.samples[i]] || 0) + (p.timeDeltas[i] || 0)
const pkg = {}; let total = 0
for (const n of p.nodes) { const t = (dt[n.id] || 0) / 1000; total += t; const cf = n.callFrame; const k = `${cf.functionName || '(anon)'} ${cf.url.replace(/.*node_modules\//, '').replace(/^file:\/\/.*\/p2p-eval\//, '')}:${cf.lineNumber}`; self.set(k, (self.get(k) || 0) + t); const m = /node_modules\/((@[^/]+\/)?[^/]+)/.exec(cf.url); const g = m ? m[1] : (cf.url.startsWith('node:') ? 'node:internal' : cf.url ? 'other' : cf.functionName); pkg[g] = (pkg[g] || 0) + t }
console.log('total ms', total.toFixed(0))
console.log(Object.entries(pkg).sort((a, b) => b[1] - a[1]).slice(0, 12).map(([k, v]) => `${(v / total * 100).toFixed(1)}% ${k}`).join('\n'))
console.log('--- top functions (self)')
console.log([...self].sort((a, b) => b[1] - a[1]).slice(0, 15).map(([k, v]) => `${(v / total * 100).toFixed(1)}% ${k}`).join('\n'))
