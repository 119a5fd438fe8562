export interface Deferred<T> {
  promise: Promise<T>;
  resolve: (v: T) => void;
  reject: (e: unknown) => void;
}

/**
 * A promise with its settle functions. The promise is marked handled at birth: a fill
 * that fails while nobody waits on it must not crash the process as an unhandled
 * rejection — whoever awaits it later still receives the error.
 */
export function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

export const noop = (): void => undefined;

/**
 * Waits for every task, then throws the first failure. A request that writes into a
 * caller's buffer from several tasks uses this, never Promise.all: with Promise.all the
 * first failure ends the request while other tasks may still copy into the buffer — which
 * by then has gone back to a pool and belongs to another request.
 */
export async function settleAll(tasks: readonly Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(tasks);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}
