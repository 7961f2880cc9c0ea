// Resource definition files: one resource, or `resources: [...]`. Same precise errors as
// cluster.yaml (file:line:col path: what is expected), and duplicate ids are errors.
import { z } from 'zod';
import { readConfigText } from './schema.js';
import { loadYamlWithSchema, ConfigError, type LoadResult } from './yaml.js';
import { ResourceSpec } from '../core/spec.js';

const ResourceList = z
  .strictObject({ resources: z.array(ResourceSpec).min(1, { error: 'expected at least one resource' }) })
  .superRefine((doc, ctx) => {
    const seen = new Map<string, number>();
    doc.resources.forEach((r, i) => {
      const first = seen.get(r.id);
      if (first !== undefined)
        ctx.addIssue({
          code: 'custom',
          path: ['resources', i, 'id'],
          message: `duplicate resource id "${r.id}" (also resources[${first}])`,
        });
      else seen.set(r.id, i);
    });
  });

export function parseResources(text: string, fileName: string): LoadResult<ResourceSpec[]> {
  const isList = /^resources\s*:/m.test(text);
  if (isList) {
    const r = loadYamlWithSchema(text, fileName, ResourceList);
    return r.ok ? { ok: true, value: r.value.resources } : r;
  }
  const r = loadYamlWithSchema(text, fileName, ResourceSpec);
  return r.ok ? { ok: true, value: [r.value] } : r;
}

export function loadResources(path: string): ResourceSpec[] {
  const r = parseResources(readConfigText(path), path);
  if (!r.ok) throw new ConfigError(r.errors);
  return r.value;
}
