/**
 * Each program reaches the other only through contracts (openapi/) or a shared package
 * (common/, image-access/), never through the other's sources: a refactor of the agent's
 * internals must not break the driver, and the other way round.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

function sources(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...sources(p));
    else if (e.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

/** The workspaces' package names (`@smartnic/driver`), each with its directory. */
const workspaces = new Map(
  ((JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { workspaces: string[] }).workspaces).map((dir) => [
    (JSON.parse(fs.readFileSync(path.join(root, dir, 'package.json'), 'utf8')) as { name: string }).name,
    dir,
  ]),
);

/**
 * Every module of this repository a file imports, as a path relative to the repository:
 * relative specifiers, and workspace packages by name (`@smartnic/dpu-agent/x.js` is
 * `dpu-agent/x.js`, the package alone its directory). Other packages are not listed.
 */
function imports(file: string): string[] {
  // TypeScript's own scanner: static imports, re-exports, import() and require() of a
  // string literal, wherever they are and however the lines break; not strings or comments.
  const specs = ts.preProcessFile(fs.readFileSync(file, 'utf8'), true, true).importedFiles.map((f) => f.fileName);
  const out: string[] = [];
  for (const s of specs) {
    if (s.startsWith('.')) {
      out.push(path.relative(root, path.resolve(path.dirname(file), s)));
      continue;
    }
    const name = s.startsWith('@') ? s.split('/').slice(0, 2).join('/') : s.split('/')[0]!;
    const dir = workspaces.get(name);
    if (dir !== undefined) out.push(`${dir}/${s.slice(name.length + 1)}`);
  }
  return out;
}

const rules: { program: string; mayNotImport: string[] }[] = [
  { program: 'driver/src', mayNotImport: ['dpu-agent/', 'lab/', 'tests/'] },
  { program: 'dpu-agent/src', mayNotImport: ['driver/', 'lab/', 'tests/'] },
  { program: 'image-access/src', mayNotImport: ['dpu-agent/', 'driver/', 'lab/', 'tests/', 'openapi/'] },
  { program: 'common/src', mayNotImport: ['dpu-agent/', 'driver/', 'image-access/', 'lab/', 'tests/', 'openapi/'] },
  // The contracts and their clients: used by both programs, so neither's sources.
  { program: 'openapi', mayNotImport: ['dpu-agent/', 'driver/', 'lab/', 'tests/'] },
];

describe('program boundaries: the import scanner', () => {
  it('sees single- and double-quoted imports, re-exports, dynamic and multi-line imports; not a string or a comment', () => {
    const dir = fs.mkdtempSync(path.join(root, '.boundaries-'));
    try {
      const file = path.join(dir, 'x.ts');
      fs.writeFileSync(
        file,
        [
          "import a from './a.js';",
          'import { b } from "./b.js";',
          "export * from './c.js';",
          'const m = "no answer from";',
          'const d = await import("./d.js");',
          "// import x from './not-code.js'",
          'import {',
          '  e,',
          "} from './e.js';",
          "export { f } from './f.js';",
          "import type { G } from './g.js';",
        ].join('\n'),
      );
      assert.deepEqual(imports(file).map((p) => path.basename(p)).sort(), ['a.js', 'b.js', 'c.js', 'd.js', 'e.js', 'f.js', 'g.js']);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("sees a workspace package imported by its name, as that package's directory", () => {
    const dir = fs.mkdtempSync(path.join(root, '.boundaries-'));
    try {
      const file = path.join(dir, 'x.ts');
      fs.writeFileSync(file, ["import { a } from '@smartnic/dpu-agent';", 'import b from "@smartnic/driver/src/config.js";', "import fastify from 'fastify';"].join('\n'));
      assert.deepEqual(imports(file), ['dpu-agent/', 'driver/src/config.js']);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('program boundaries', () => {
  for (const rule of rules) {
    it(`${rule.program} imports nothing from ${rule.mayNotImport.join(', ')}`, () => {
      const bad: string[] = [];
      for (const file of sources(path.join(root, rule.program))) {
        for (const target of imports(file)) {
          if (rule.mayNotImport.some((p) => target.startsWith(p))) bad.push(`${path.relative(root, file)} → ${target}`);
        }
      }
      assert.deepEqual(bad, [], 'use the shared packages (image-access/, common/) or the openapi contracts instead');
    });
  }
});
