/**
 * The link-rate estimate background requests are sized from (image-access/src/share-meter.ts),
 * on a scripted clock: a backlog read in one go after an event-loop stall, idle time and
 * time the host had the link must not pass for the link's rate.
 */
import assert from 'node:assert/strict';
import { ShareMeter } from '../../image-access/src/share-meter.js';

const MB = 1e6;

/** One request streaming `rate` bytes/s from t0 for `ms`, delivered every `step` ms. */
function stream(m: ShareMeter, t0: number, ms: number, rate: number, step = 1): number {
  m.begin(t0);
  for (let t = t0 + step; t <= t0 + ms; t += step) m.bytes((rate * step) / 1000, t);
  m.end(t0 + ms);
  return t0 + ms;
}

describe('ShareMeter: the rate background requests are sized from', () => {
  it('measures a steady stream', () => {
    const m = new ShareMeter();
    assert.equal(m.rate, 0, 'unknown before a first window');
    stream(m, 0, 200, 125 * MB);
    assert.ok(Math.abs(m.rate - 125 * MB) < 1 * MB, `${m.rate}`);
  });

  it('a backlog read in one go after a stall does not pass for a fast link (the defect: 2,988 MB/s seen on a 125 MB/s link)', () => {
    const m = new ShareMeter();
    let t = stream(m, 0, 200, 125 * MB);
    // A window that begins late: the host's read ends (resume) while the event loop is
    // stalled, and 15 ms of background bytes that waited in the socket buffer are read at
    // once, at the window's very start; then the stream goes on at the link's rate.
    m.begin(t);
    m.suspend();
    t += 50;
    m.resume(t);
    m.bytes(125 * MB * 0.015, t + 0.1);
    for (let i = 1; i <= 100; i++) m.bytes(125 * MB * 0.001, t + 0.1 + i);
    m.end(t + 100.1);
    assert.ok(m.rate < 130 * MB, `${(m.rate / MB).toFixed(1)} MB/s`);
  });

  it('one stream of short requests is measured: busy time adds up across requests, the gaps between them do not count', () => {
    const m = new ShareMeter();
    let t = 0;
    // 8 ms requests at 125 MB/s with 2 ms between them (a round trip and the origin's time):
    // no single request lasts a window.
    for (let i = 0; i < 10; i++) t = stream(m, t, 8, 125 * MB) + 2;
    assert.ok(Math.abs(m.rate - 125 * MB) < 1 * MB, `${(m.rate / MB).toFixed(1)} MB/s`);
  });

  it('a pause with nothing in flight is not a slow link', () => {
    const m = new ShareMeter();
    let t = stream(m, 0, 10, 100 * MB);
    t += 500; // hydration paused: no request in flight
    stream(m, t, 10, 100 * MB);
    assert.ok(Math.abs(m.rate - 100 * MB) < 1 * MB, `${(m.rate / MB).toFixed(1)} MB/s`);
  });

  it('time the host reads is not measured: the background gets a sliver of the link then', () => {
    const m = new ShareMeter();
    m.begin(0);
    m.suspend();
    for (let i = 1; i <= 200; i++) m.bytes(10 * MB * 0.001, i);
    assert.equal(m.rate, 0, 'nothing measured while suspended');
    m.resume(200);
    for (let i = 201; i <= 230; i++) m.bytes(100 * MB * 0.001, i);
    m.end(230);
    assert.ok(Math.abs(m.rate - 100 * MB) < 1 * MB, `from the resume on only: ${(m.rate / MB).toFixed(1)} MB/s`);
  });

  it('a request that ends while the host reads leaves no window behind', () => {
    const m = new ShareMeter();
    m.begin(0);
    for (let i = 1; i <= 15; i++) m.bytes(100 * MB * 0.001, i);
    m.suspend(); // 15 ms of the window are dropped with it
    m.end(40);
    m.resume(41);
    stream(m, 50, 20, 50 * MB);
    assert.ok(Math.abs(m.rate - 50 * MB) < 1 * MB, `${(m.rate / MB).toFixed(1)} MB/s`);
  });

  it('follows a link that slows down (median of the last windows)', () => {
    const m = new ShareMeter();
    let t = stream(m, 0, 400, 1000 * MB);
    t = stream(m, t, 400, 100 * MB);
    assert.ok(Math.abs(m.rate - 100 * MB) < 2 * MB, `${(m.rate / MB).toFixed(1)} MB/s`);
  });
});
