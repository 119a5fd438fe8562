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
