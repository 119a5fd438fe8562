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

  it('time with nothing in flight, or with the host reading, is not counted', () => {
    const m = new ShareMeter();
    let t = stream(m, 0, 100, 100 * MB);
    t += 500; // idle: hydration paused
    t = stream(m, t, 100, 100 * MB);
    m.begin(t);
    m.suspend(); // the host reads: the background gets a sliver of the link
    for (let i = 1; i <= 100; i++) m.bytes(10 * MB * 0.001, t + i);
    m.resume(t + 100);
    for (let i = 101; i <= 200; i++) m.bytes(100 * MB * 0.001, t + i);
    m.end(t + 200);
    assert.ok(Math.abs(m.rate - 100 * MB) < 2 * MB, `${(m.rate / MB).toFixed(1)} MB/s`);
  });

  it('follows a link that slows down (median of the last windows)', () => {
    const m = new ShareMeter();
    let t = stream(m, 0, 400, 1000 * MB);
    t = stream(m, t, 400, 100 * MB);
    assert.ok(Math.abs(m.rate - 100 * MB) < 2 * MB, `${(m.rate / MB).toFixed(1)} MB/s`);
  });
});
