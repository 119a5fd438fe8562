// stub: node-datachannel cannot be installed here (prebuilt binary and its source both come from GitHub)
export const RTCPeerConnection = undefined, RTCSessionDescription = undefined, RTCIceCandidate = undefined
export default {}
