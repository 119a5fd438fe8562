import WebTorrent from 'webtorrent'
const c = new WebTorrent({ dht: false, tracker: false, lsd: false, natUpnp: false, natPmp: false, utp: true })
console.log('loaded; WEBRTC_SUPPORT', WebTorrent.WEBRTC_SUPPORT, 'utp enabled:', c.utp, '_utp?', !!c._connPool?._utpServer)
c.on('error', e => console.log('client error', e.message))
c.on('listening', () => { console.log('listening on', c.torrentPort, 'tcp?', !!c._connPool?.tcpServer, 'utp?', !!c._connPool?.utpServer); c.destroy() })
setTimeout(() => { console.log('connPool keys', Object.keys(c._connPool||{})); c.destroy() }, 1500)
