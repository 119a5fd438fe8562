/**
 * Flags declared once: parsing, validation, defaults and `--help` all come from these
 * tables, so the reference cannot drift from the behaviour (docs/dpu-agent.md copies it).
 */
import { parseArgs } from 'node:util';
import { DpuError } from '../../../image-access/src/errors.js';
import { parseDuration, parseRate, parseSize } from './units.js';

type Kind = 'string' | 'size' | 'rate' | 'duration' | 'int' | 'boolean' | 'list';

export interface FlagSpec {
  kind: Kind;
  help: string;
  /** Shown in help, e.g. URL or PATH. */
  arg?: string;
  required?: boolean;
  default?: string | boolean;
  /** Lower bound for int, size, rate and duration values. */
  min?: number;
  /** Upper bound, as `min`. */
  max?: number;
}

export type FlagTable = Record<string, FlagSpec>;
export type FlagValues = Record<string, string | number | boolean | string[] | undefined>;

export function parseFlags(table: FlagTable, argv: string[], command: string): FlagValues {
  const options: Record<string, { type: 'string' | 'boolean'; multiple?: boolean }> = { help: { type: 'boolean' } };
  for (const [name, spec] of Object.entries(table)) {
    options[name] = spec.kind === 'boolean' ? { type: 'boolean' } : spec.kind === 'list' ? { type: 'string', multiple: true } : { type: 'string' };
  }
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: false });
  } catch (err) {
    throw new DpuError('DPU_ERR_CONFIG', `${(err as Error).message.replace(/\. To specify.*$/s, '')}; see "dpu-agent ${command} --help"`);
  }
  const raw = parsed.values as Record<string, string | boolean | string[] | undefined>;
  const out: FlagValues = { help: raw['help'] === true };
  if (out['help']) return out;
  for (const [name, spec] of Object.entries(table)) {
    const v = raw[name] ?? spec.default;
    if (v === undefined) {
      if (spec.required) throw new DpuError('DPU_ERR_CONFIG', `--${name} is required (${spec.help.split('.')[0]}); see "dpu-agent ${command} --help"`);
      continue;
    }
    out[name] = convert(name, spec, v);
  }
  return out;
}

function convert(name: string, spec: FlagSpec, v: string | boolean | string[]): string | number | boolean | string[] {
  const flag = `--${name}`;
  let n: number;
  switch (spec.kind) {
    case 'boolean':
    case 'list':
    case 'string':
      if (spec.kind === 'string' && v === '') throw new DpuError('DPU_ERR_CONFIG', `${flag} must not be empty`);
      return v;
    case 'size':
      n = parseSize(String(v), flag);
      break;
    case 'rate':
      n = parseRate(String(v), flag);
      break;
    case 'duration':
      n = parseDuration(String(v), flag);
      break;
    case 'int':
      n = Number(v);
      if (!Number.isSafeInteger(n)) throw new DpuError('DPU_ERR_CONFIG', `${flag} "${String(v)}" is not an integer`);
      break;
  }
  if (spec.min !== undefined && n < spec.min) throw new DpuError('DPU_ERR_CONFIG', `${flag} ${String(v)} is below the minimum of ${spec.min}`);
  if (spec.max !== undefined && n > spec.max) throw new DpuError('DPU_ERR_CONFIG', `${flag} ${String(v)} is above the maximum of ${spec.max}`);
  return n;
}

export function renderHelp(usage: string, summary: string, table: FlagTable): string {
  const rows = Object.entries(table).map(([name, s]) => {
    const left = `  --${name}${s.kind === 'boolean' ? '' : ` ${s.arg ?? s.kind.toUpperCase()}`}`;
    const tail = [s.required ? '(required)' : '', s.default !== undefined && s.kind !== 'boolean' ? `(default ${String(s.default)})` : '', s.kind === 'list' ? '(repeatable)' : '']
      .filter(Boolean)
      .join(' ');
    return { left, right: `${s.help}${tail ? ' ' + tail : ''}` };
  });
  const width = Math.max(...rows.map((r) => r.left.length)) + 2;
  const body = rows.map((r) => r.left.padEnd(width) + wrap(r.right, 100 - width).join('\n' + ' '.repeat(width))).join('\n');
  return `Usage: ${usage}\n\n${summary}\n\nOptions:\n${body}\n  --help${' '.repeat(Math.max(1, width - 8))}Show this help.\n`;
}

/** Splits `text` into lines of at most `width` characters, at spaces. */
export function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(/\s+/)) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(line);
  return lines;
}
