/**
 * A configuration value is wrong; `key` names it (`listen.port`). Its own module, free of
 * the loader's dependencies (a YAML parser and a JSON Schema validator: ~80 ms of start-up
 * here), so `dpu-agent stream`, which only checks flags, starts without them.
 */
export class ConfigError extends Error {
  constructor(
    message: string,
    readonly key?: string,
  ) {
    super(message);
    this.name = 'ConfigError';
  }
}
