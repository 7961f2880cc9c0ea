// Errors of `corral clone`: code, message naming the place, hint (STYLE habit 10).
import { CorralError } from '../../core/errors.js';

export class CloneError extends CorralError {
  constructor(code: string, message: string, hint?: string) {
    super(code, message, hint);
  }
}

export class CloneProtocolError extends CloneError {
  constructor(message: string) {
    super(
      'CORRAL_CLONE_PROTOCOL',
      `clone protocol: ${message}`,
      'both ends must run the same corral version',
    );
  }
}

export class CloneRefusedError extends CloneError {
  constructor(
    readonly refusal: string,
    message: string,
    hint?: string,
  ) {
    super('CORRAL_CLONE_REFUSED', message, hint);
  }
}

export class CloneUnreachableError extends CloneError {
  constructor(where: string, reason: string) {
    super(
      'CORRAL_CLONE_UNREACHABLE',
      `${where}: cannot reach the clone server (${reason})`,
      'check --server HOST:PORT and that `corral clone serve` is running',
    );
  }
}

export class CloneTargetError extends CloneError {
  constructor(where: string, message: string, hint?: string) {
    super('CORRAL_CLONE_TARGET', `${where}: ${message}`, hint);
  }
}

export class CloneSourceError extends CloneError {
  constructor(where: string, message: string, hint?: string) {
    super('CORRAL_CLONE_SOURCE', `${where}: ${message}`, hint);
  }
}
