// Config schema versions and migrations. Each cluster.yaml says which schema `version` it is written
// for; a file of an older version is migrated step by step (N -> N+1) before validation, and
// `corral config migrate FILE` writes the result. Only version 1 exists today, so the table is empty;
// a future version 2 adds `{ from: 1, describe: '...', up: (doc) => ... }` here.

/** The version this corral writes and validates against. */
export const configVersionCurrent = 1;

export type PlainMapping = Record<string, unknown>;

export interface Migration {
  /** The version this step reads; it produces version `from + 1`. */
  readonly from: number;
  /** One line for the operator, e.g. "timings.leaseTtl (s) becomes timings.leaseTtlMs (ms)". */
  readonly describe: string;
  /** Rewrites a plain document; must not mutate its argument. The machinery sets `version`. */
  readonly up: (doc: PlainMapping) => PlainMapping;
}

/** Version N -> N+1 steps, in order. Empty: version 1 is the first schema version. */
export const migrations: readonly Migration[] = [];

/** Every version this corral can read: the current one and those with a migration path to it. */
export function supportedVersions(table: readonly Migration[] = migrations, target = configVersionCurrent) {
  const versions = [target];
  for (let v = target - 1; table.some((m) => m.from === v); v--) versions.unshift(v);
  return versions;
}

export type MigrateResult =
  | { ok: true; doc: PlainMapping; from: number; to: number; applied: string[] }
  | { ok: false; message: string };

/** Migrates a parsed document to `target`; says precisely why when it cannot. */
export function migrateDoc(
  doc: unknown,
  table: readonly Migration[] = migrations,
  target = configVersionCurrent,
): MigrateResult {
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc))
    return { ok: false, message: 'expected a mapping at the top of the file' };
  const from = (doc as PlainMapping).version;
  const supported = supportedVersions(table, target).join(', ');
  if (typeof from !== 'number' || !Number.isInteger(from))
    return {
      ok: false,
      message: `the file has no integer \`version\` field (this corral supports ${supported})`,
    };
  if (from > target)
    return {
      ok: false,
      message: `version ${from} is newer than this corral supports (${supported}); upgrade corral to read this file`,
    };
  let cur = doc as PlainMapping;
  const applied: string[] = [];
  for (let v = from; v < target; v++) {
    const step = table.find((m) => m.from === v);
    if (!step)
      return { ok: false, message: `version ${from} is not supported (this corral supports ${supported})` };
    cur = { ...step.up(cur), version: v + 1 };
    applied.push(`${v} -> ${v + 1}: ${step.describe}`);
  }
  return { ok: true, doc: cur, from, to: target, applied };
}

/** The `prepare` hook for loading: migrates when it can, else leaves the data for the schema to judge. */
export function migrateIfPossible(data: unknown): unknown {
  const r = migrateDoc(data);
  return r.ok ? r.doc : data;
}
