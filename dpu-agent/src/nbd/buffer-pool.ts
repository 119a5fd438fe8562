/**
 * Reply buffers, reused. Allocating a fresh buffer per read reply made V8 run ~40 full
 * GCs a second at 1 MiB reads (external memory pressure; see docs/benchmarks.md): a
 * buffer goes back to the pool when the socket has taken its bytes. Size classes are
 * powers of two; each class keeps at most `classBytes` worth of idle buffers.
 */
/**
 * Test builds (DPU_AGENT_POISON_BUFFERS=1): a released buffer is filled with POISON and
 * checked when it is handed out again; a byte that changed means something wrote into a
 * request's buffer after the request ended — into another request's reply, in production.
 * The process then stops at once (uncaught), which fails whatever test was running.
 */
const POISON_BUFFERS = process.env['DPU_AGENT_POISON_BUFFERS'] === '1';
export const POISON = 0xdb;

const MIN_CLASS_SHIFT = 13; // 8 KiB: a 4 KiB read reply (4 KiB + 16) fits
const MAX_CLASS_SHIFT = 26; // 64 MiB: the largest reply (32 MiB + 16) fits

export class BufferPool {
  private readonly free: Buffer[][] = [];
  private readonly maxIdle: number[] = [];

  constructor(classBytes = 32 << 20, maxPerClass = 256) {
    for (let s = 0; s <= MAX_CLASS_SHIFT; s++) {
      this.free.push([]);
      this.maxIdle.push(Math.max(1, Math.min(maxPerClass, Math.floor(classBytes / 2 ** s))));
    }
  }

  /** A buffer of exactly `size` bytes (a view of a pooled one). */
  acquire(size: number): Buffer {
    const shift = Math.max(MIN_CLASS_SHIFT, Math.ceil(Math.log2(size)));
    if (shift > MAX_CLASS_SHIFT) return Buffer.allocUnsafe(size);
    const reused = this.free[shift]!.pop();
    if (reused && POISON_BUFFERS) checkPoison(reused);
    const whole = reused ?? Buffer.allocUnsafeSlow(2 ** shift);
    return whole.subarray(0, size);
  }

  /** Gives back a buffer from acquire(); its bytes must no longer be in use. */
  release(buf: Buffer): void {
    const whole = Buffer.from(buf.buffer, buf.byteOffset, buf.buffer.byteLength - buf.byteOffset);
    const shift = Math.log2(whole.length);
    if (!Number.isInteger(shift) || shift < MIN_CLASS_SHIFT || shift > MAX_CLASS_SHIFT || buf.byteOffset !== 0) return;
    const list = this.free[shift]!;
    if (list.length < this.maxIdle[shift]!) {
      if (POISON_BUFFERS) whole.fill(POISON);
      list.push(whole);
    }
  }
}

const POISON_BLOCK = Buffer.alloc(64 << 10, POISON);

/** Compared 64 KiB at a time with memcmp: a byte-by-byte callback cost tests ~1 ms per MiB. */
function checkPoison(buf: Buffer): void {
  let at = -1;
  for (let o = 0; o < buf.length && at < 0; o += POISON_BLOCK.length) {
    const part = buf.subarray(o, Math.min(buf.length, o + POISON_BLOCK.length));
    if (!part.equals(POISON_BLOCK.subarray(0, part.length))) at = o + part.findIndex((b) => b !== POISON);
  }
  if (at >= 0) throw new Error(`DPU_AGENT_POISON_BUFFERS: byte ${at} of a ${buf.length}-byte pooled buffer changed after its request ended (a late write into another request's buffer)`);
}
