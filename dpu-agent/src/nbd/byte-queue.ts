/**
 * A queue of received socket chunks, consumed without copying where possible (undici's
 * receiver does the same): a request header that lies inside one chunk is a view of it,
 * and a write payload is handed on as the list of chunk views it spans.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  /** Bytes of chunks[head] already consumed. */
  private offset = 0;
  length = 0;

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.length += b.length;
  }

  /** The next n bytes (n ≤ length): a view when they lie in one chunk, else a copy. */
  take(n: number): Buffer {
    const first = this.chunks[this.head]!;
    if (first.length - this.offset >= n) {
      const view = first.subarray(this.offset, this.offset + n);
      this.advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const c = this.chunks[this.head]!;
      const k = Math.min(c.length - this.offset, n - done);
      c.copy(out, done, this.offset, this.offset + k);
      done += k;
      this.advance(k);
    }
    return out;
  }

  /** The next n bytes (n ≤ length) as views of the chunks they span. */
  takeChunks(n: number): Buffer[] {
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[this.head]!;
      const k = Math.min(c.length - this.offset, left);
      out.push(c.subarray(this.offset, this.offset + k));
      left -= k;
      this.advance(k);
    }
    return out;
  }

  /** Drops up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    let left = Math.min(n, this.length);
    const dropped = left;
    while (left > 0) {
      const c = this.chunks[this.head]!;
      const k = Math.min(c.length - this.offset, left);
      left -= k;
      this.advance(k);
    }
    return dropped;
  }

  private advance(k: number): void {
    this.offset += k;
    this.length -= k;
    if (this.offset === this.chunks[this.head]!.length) {
      this.chunks[this.head] = undefined as unknown as Buffer; // let the chunk go
      this.head++;
      this.offset = 0;
      if (this.head === this.chunks.length) {
        this.chunks = [];
        this.head = 0;
      } else if (this.head > 1024) {
        this.chunks = this.chunks.slice(this.head);
        this.head = 0;
      }
    }
  }
}
