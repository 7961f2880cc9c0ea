// Errors and invariants shared by every layer. Expected failures carry a code, the
// place they concern and a hint for the fix; bugs throw InvariantError (STYLE habit 10).

export class CorralError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly hint?: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** A broken invariant is a bug: callers crash, self-fence, restart. Never caught to carry on. */
export class InvariantError extends CorralError {
  constructor(message: string) {
    super('CORRAL_INVARIANT', `invariant violated: ${message}`);
  }
}

export function invariant(cond: unknown, message: string | (() => string)): asserts cond {
  if (!cond) throw new InvariantError(typeof message === 'function' ? message() : message);
}

export function assertNever(x: never, what = 'value'): never {
  throw new InvariantError(`unexpected ${what}: ${JSON.stringify(x)}`);
}
