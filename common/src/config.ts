/**
 * Configuration declared once, as a JSON Schema whose properties carry `default` and
 * `description`: the loader validates a YAML/JSON file against it at start-up (errors
 * name the key: `config.listen.port must be <= 65535`), fills in defaults, and freezes the
 * result; `renderConfigDocs` turns the same schema into the reference table in docs/.
 */
import fs from 'node:fs';
import { Ajv, type ErrorObject } from 'ajv';
import { parse as parseYaml } from 'yaml';
import { ConfigError } from './config-error.js';

export type ConfigSchema = {
  type: 'object';
  properties: Record<string, ConfigProp>;
  required?: string[];
  additionalProperties: false;
};

export type ConfigProp = {
  description: string;
  type?: string | string[];
  default?: unknown;
  /** Shown in docs instead of the value (secrets). */
  secret?: boolean;
  [k: string]: unknown;
};

export { ConfigError };

function describeErrors(errors: readonly ErrorObject[]): { message: string; key: string } {
  const e = errors[0]!;
  const path = e.instancePath.split('/').filter(Boolean);
  const p = e.params as Record<string, unknown>;
  if (e.keyword === 'additionalProperties') {
    const key = [...path, String(p['additionalProperty'])].join('.');
    return { key, message: `config key "${key}" is not known (a typo?)` };
  }
  if (e.keyword === 'required') {
    const key = [...path, String(p['missingProperty'])].join('.');
    return { key, message: `config key "${key}" is required` };
  }
  const key = path.join('.');
  const detail = e.keyword === 'enum' ? `must be one of ${(p['allowedValues'] as unknown[]).map((v) => JSON.stringify(v)).join(', ')}` : (e.message ?? 'is invalid');
  return { key, message: `config key "${key}" ${detail}` };
}

/** Validates `raw` (an object) against `schema`, with defaults applied; returns it frozen. */
export function validateConfig<T>(schema: ConfigSchema, raw: unknown, source: string): Readonly<T> {
  const ajv = new Ajv({ useDefaults: true, strict: false, allErrors: false, coerceTypes: false });
  const validate = ajv.compile(schema as object);
  const data = structuredClone(raw ?? {});
  if (!validate(data)) {
    const { message, key } = describeErrors(validate.errors!);
    throw new ConfigError(`${source}: ${message}`, key);
  }
  return deepFreeze(data) as Readonly<T>;
}

/** Reads a YAML or JSON config file and validates it. */
export function loadConfigFile<T>(schema: ConfigSchema, file: string): Readonly<T> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read config file ${file}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (err) {
    throw new ConfigError(`${file} is not valid YAML/JSON: ${(err as Error).message.split('\n')[0]}`);
  }
  if (raw !== null && (typeof raw !== 'object' || Array.isArray(raw))) throw new ConfigError(`${file} must hold a mapping of config keys`);
  return validateConfig<T>(schema, raw, file);
}

/**
 * The tokens a service accepts: `auth.tokens` plus the lines of `auth.token_file` (blank
 * lines and # comments ignored). Both services authenticate the same way.
 */
export function resolveTokenList(auth: { readonly tokens: readonly string[]; readonly token_file?: string | undefined }): string[] {
  const tokens = [...auth.tokens];
  if (auth.token_file) {
    let text: string;
    try {
      text = fs.readFileSync(auth.token_file, 'utf8');
    } catch (err) {
      throw new ConfigError(`config key "auth.token_file": cannot read ${auth.token_file}: ${(err as Error).message}`, 'auth.token_file');
    }
    for (const line of text.split('\n')) {
      const t = line.trim();
      if (!t || t.startsWith('#')) continue;
      if (t.length < 16) throw new ConfigError(`config key "auth.token_file": ${auth.token_file} holds a token shorter than 16 characters`, 'auth.token_file');
      tokens.push(t);
    }
  }
  return tokens;
}

/** The reference table for docs: key, type, default, description (nested keys dotted). */
export function renderConfigDocs(schema: ConfigSchema): string {
  const rows: string[] = ['| key | type | default | meaning |', '|---|---|---|---|'];
  const walk = (props: Record<string, ConfigProp>, prefix: string): void => {
    for (const [k, p] of Object.entries(props)) {
      const key = prefix + k;
      const type = Array.isArray(p.type) ? p.type.join(' or ') : (p.type ?? '');
      const def = p.secret ? '(secret)' : p.default === undefined ? '—' : `\`${JSON.stringify(p.default)}\``;
      rows.push(`| \`${key}\` | ${type} | ${def} | ${p.description} |`);
      const nested = p['properties'] as Record<string, ConfigProp> | undefined;
      if (p.type === 'object' && nested) walk(nested, `${key}.`);
    }
  };
  walk(schema.properties, '');
  return rows.join('\n') + '\n';
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}
