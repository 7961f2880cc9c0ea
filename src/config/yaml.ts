// Generic YAML + zod loading with precise positions. Every user-written file (cluster.yaml, resource
// and VM definitions, scenario files) goes through loadYamlWithSchema, so every mistake is reported as
//
//   cluster.yaml:14:9 nodes[2].capacity.memory: expected a positive integer (MiB), got "lots"
//
// and ALL mistakes of a file are reported at once, not only the first.
//
// Conventions for schemas used with this loader:
// - Use strict objects (z.strictObject): unknown keys become errors with a "did you mean" suggestion.
// - A message that starts with "expected " (and has no ", got ") describes what is valid; the loader
//   appends what was found (", got \"lots\"") or says the field is missing. Other messages
//   (cross-field refinements) are printed as they are, so they name the fields and the rule themselves.
// - Issue paths are those of the input document; the position is that of the offending value, or of
//   its key (or its parent) when the value is missing or empty.
import { isAlias, isMap, isPair, isScalar, isSeq, LineCounter, parseDocument } from 'yaml';
import type { Document, Node as YamlNode } from 'yaml';
import { z } from 'zod';
import { CorralError } from '../core/errors.js';

export interface ConfigIssue {
  /** The file name as given by the caller (printed as-is). */
  readonly file: string;
  /** 1-based line and column. */
  readonly line: number;
  readonly column: number;
  /** Field path like `nodes[2].capacity.memory`; '' for problems of the whole document (syntax). */
  readonly path: string;
  readonly message: string;
}

export type LoadResult<T> = { ok: true; value: T } | { ok: false; errors: ConfigIssue[] };

export type PathSegment = string | number;

/** The limit on how many alias expansions a document may make (defends against "billion laughs"). */
const yamlAliasCountMax = 100;
/** A found value longer than this is shortened in messages. */
const shownValueCharsMax = 60;

export class ConfigError extends CorralError {
  constructor(
    readonly issues: readonly ConfigIssue[],
    hint = 'fix the fields named above; `corral config validate FILE` lists every problem',
  ) {
    const file = issues[0]?.file ?? 'config';
    const count = issues.length === 1 ? '1 problem' : `${issues.length} problems`;
    super('CORRAL_CONFIG_INVALID', `${file}: ${count}\n${formatIssues(issues)}`, hint);
  }
}

export function formatIssue(i: ConfigIssue): string {
  const where = `${i.file}:${i.line}:${i.column}`;
  return i.path ? `${where} ${i.path}: ${i.message}` : `${where}: ${i.message}`;
}

export function formatIssues(issues: readonly ConfigIssue[]): string {
  return issues.map(formatIssue).join('\n');
}

/** Renders a zod/YAML path as `nodes[2].capacity.memory` (odd keys are quoted: `labels["a.b/c"]`). */
export function renderPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const seg of path) {
    if (typeof seg === 'number') out += `[${seg}]`;
    else if (/^[A-Za-z_][A-Za-z0-9_-]*$/.test(String(seg))) out += out ? `.${String(seg)}` : String(seg);
    else out += `[${JSON.stringify(String(seg))}]`;
  }
  return out;
}

/** A parsed YAML text: the document (for positions), its plain value and any syntax errors. */
export interface ParsedYaml {
  readonly doc: Document.Parsed;
  readonly lines: LineCounter;
  readonly data: unknown;
  readonly errors: ConfigIssue[];
}

export function parseYaml(text: string, fileName: string): ParsedYaml {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: true, uniqueKeys: true });
  const errors = doc.errors.map((e) => {
    const pos = e.linePos?.[0] ?? { line: 1, col: 1 };
    const what = (e.message.split('\n')[0] ?? e.message).replace(/ at line \d+, column \d+:?$/, '');
    return { file: fileName, line: pos.line, column: pos.col, path: '', message: `YAML syntax: ${what}` };
  });
  const data = errors.length ? undefined : doc.toJS({ maxAliasCount: yamlAliasCountMax });
  return { doc, lines, data, errors };
}

/**
 * Parses `text` as YAML and validates it with `schema`. Returns the parsed value, or every problem found
 * with file:line:column, field path and a message saying what is expected and what was found.
 * `prepare` may rewrite the plain data before validation (e.g. schema-version migrations).
 */
export function loadYamlWithSchema<T>(
  text: string,
  fileName: string,
  schema: z.ZodType<T>,
  prepare?: (data: unknown) => unknown,
): LoadResult<T> {
  const parsed = parseYaml(text, fileName);
  if (parsed.errors.length) return { ok: false, errors: parsed.errors };
  return validateParsed(parsed, fileName, schema, prepare);
}

export function validateParsed<T>(
  parsed: ParsedYaml,
  fileName: string,
  schema: z.ZodType<T>,
  prepare?: (data: unknown) => unknown,
): LoadResult<T> {
  const data = prepare ? prepare(parsed.data) : parsed.data;
  const allowedKeys = new WeakMap<object, string[]>();
  const result = schema.safeParse(data, {
    error: (iss) => {
      if (iss.code === 'unrecognized_keys') {
        if (iss.inst instanceof z.ZodObject && typeof iss.input === 'object' && iss.input)
          allowedKeys.set(iss.input, Object.keys(iss.inst.shape));
        return 'unknown key';
      }
      return expectedMessage(iss);
    },
  });
  if (result.success) return { ok: true, value: result.data };

  const errors: ConfigIssue[] = [];
  for (const iss of result.error.issues) {
    if (iss.code === 'unrecognized_keys') {
      const owner = valueAt(data, iss.path);
      const allowed = (typeof owner === 'object' && owner && allowedKeys.get(owner)) || [];
      for (const key of iss.keys) {
        const at = locate(parsed, [...iss.path, key]);
        errors.push(
          issueAt(fileName, at.keyPos ?? at.pos, [...iss.path, key], unknownKeyMessage(key, allowed)),
        );
      }
      continue;
    }
    const at = locate(parsed, iss.path);
    let message = iss.message;
    if (message.startsWith('expected ') && !message.includes(', got ')) {
      if (!at.found) message = `missing required field, ${message}`;
      else message = `${message}, got ${at.empty ? 'nothing' : showValue(valueAt(data, iss.path))}`;
    }
    const pos = at.found && !at.empty ? at.pos : (at.keyPos ?? at.pos);
    errors.push(issueAt(fileName, pos, iss.path, message));
  }
  errors.sort((a, b) => a.line - b.line || a.column - b.column);
  return { ok: false, errors: dedupe(errors) };
}

function issueAt(file: string, pos: Pos, path: readonly PropertyKey[], message: string): ConfigIssue {
  return { file, line: pos.line, column: pos.col, path: renderPath(path), message };
}

function dedupe(issues: ConfigIssue[]): ConfigIssue[] {
  const seen = new Set<string>();
  return issues.filter((i) => {
    const k = formatIssue(i);
    return seen.has(k) ? false : (seen.add(k), true);
  });
}

// ---- messages ---------------------------------------------------------------------------------

type RawIssue = z.core.$ZodRawIssue;

const typeNames: Record<string, string> = {
  object: 'a mapping',
  array: 'a list',
  string: 'a string',
  number: 'a number',
  int: 'an integer',
  boolean: 'true or false',
  null: 'null',
};

/** Default "expected ..." messages for zod's built-in issues (schemas may give their own). */
function expectedMessage(iss: RawIssue): string | undefined {
  switch (iss.code) {
    case 'invalid_type':
      return `expected ${typeNames[iss.expected] ?? iss.expected}`;
    case 'too_small':
    case 'too_big': {
      const bound = iss.code === 'too_small' ? iss.minimum : iss.maximum;
      const small = iss.code === 'too_small';
      const cmp = small ? 'at least' : 'at most';
      if (iss.origin === 'array') return `expected a list with ${cmp} ${bound} item(s)`;
      if (iss.origin === 'string') return `expected a string with ${cmp} ${bound} character(s)`;
      return `expected a number ${small ? '>' : '<'}${iss.inclusive ? '=' : ''} ${bound}`;
    }
    case 'invalid_value':
      return `expected ${iss.values.length === 1 ? '' : 'one of '}${iss.values.map((v) => JSON.stringify(v)).join(', ')}`;
    case 'invalid_format':
      return iss.format === 'regex' && 'pattern' in iss
        ? `expected a string matching ${String(iss.pattern)}`
        : `expected a valid ${iss.format}`;
    case 'invalid_union':
      if ('discriminator' in iss && Array.isArray(iss.options))
        return `expected ${iss.discriminator} to be one of ${iss.options.map((o) => `\`${String(o)}\``).join(', ')}`;
      return undefined;
    default:
      return undefined;
  }
}

/** How a found value is shown after "got": strings quoted, collections named, long values cut. */
export function showValue(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (Array.isArray(v)) return v.length ? 'a list' : 'an empty list';
  if (v !== null && typeof v === 'object') return 'a mapping';
  const s = typeof v === 'string' ? JSON.stringify(v) : String(v);
  return s.length > shownValueCharsMax ? `${s.slice(0, shownValueCharsMax)}…` : s;
}

function unknownKeyMessage(key: string, allowed: readonly string[]): string {
  const best = closest(key, allowed);
  if (best) return `unknown key, did you mean \`${best}\`?`;
  if (!allowed.length) return 'unknown key';
  return `unknown key; allowed here: ${allowed.map((k) => `\`${k}\``).join(', ')}`;
}

/** The allowed key nearest to `key` by edit distance, if it is near enough to be a likely typo. */
export function closest(key: string, allowed: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of allowed) {
    const d = editDistance(key.toLowerCase(), candidate.toLowerCase());
    if (d < bestDistance) [best, bestDistance] = [candidate, d];
  }
  const tolerance = Math.max(2, Math.floor(key.length / 3));
  return bestDistance <= tolerance ? best : undefined;
}

/** Levenshtein distance (insert, delete, substitute; each costs 1). */
export function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      const sub = (prev[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1);
      cur[j] = Math.min((prev[j] ?? 0) + 1, (cur[j - 1] ?? 0) + 1, sub);
    }
    prev = cur;
  }
  return prev[b.length] ?? 0;
}

// ---- positions --------------------------------------------------------------------------------

interface Pos {
  line: number;
  col: number;
}

interface Located {
  /** Whether the whole path exists in the document. */
  found: boolean;
  /** Whether the found value is empty (`memory:` with nothing after it). */
  empty: boolean;
  /** Position of the deepest node reached (the value itself when found). */
  pos: Pos;
  /** Position of the key leading to that node, if it sits in a mapping. */
  keyPos?: Pos;
}

function locate(parsed: ParsedYaml, path: readonly PropertyKey[]): Located {
  const { doc, lines } = parsed;
  const posOf = (n: unknown): Pos | undefined => {
    const r = (n as YamlNode | null)?.range;
    return r ? lines.linePos(r[0]) : undefined;
  };
  let node: unknown = doc.contents;
  let keyNode: unknown;
  let found = true;
  for (const seg of path) {
    if (isAlias(node)) node = node.resolve(doc);
    let next: unknown;
    let nextKey: unknown;
    if (isMap(node)) {
      const pair = node.items.find((p) => isPair(p) && keyText(p.key) === String(seg));
      if (pair) [next, nextKey] = [pair.value ?? null, pair.key];
    } else if (isSeq(node) && typeof seg === 'number') {
      next = node.items[seg];
    }
    if (next === undefined) {
      found = false;
      break;
    }
    // `key:` with no value parses as an empty scalar; keep the key's position for it.
    [node, keyNode] = [next, nextKey];
  }
  const empty =
    node === null || (isScalar(node) && node.value === null && node.range?.[0] === node.range?.[1]);
  const pos = posOf(node) ?? posOf(keyNode) ?? { line: 1, col: 1 };
  return { found, empty, pos, keyPos: posOf(keyNode) };
}

function keyText(key: unknown): string {
  return isScalar(key) ? String(key.value) : String(key);
}

/** The plain value at `path` in `data`, or undefined when the path does not exist. */
export function valueAt(data: unknown, path: readonly PropertyKey[]): unknown {
  let cur = data;
  for (const seg of path) {
    if (cur === null || typeof cur !== 'object') return undefined;
    cur = (cur as Record<PropertyKey, unknown>)[seg];
  }
  return cur;
}
