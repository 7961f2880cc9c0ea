// API errors: one JSON shape {code, message, path, hint} and one table of HTTP statuses.
// Bad input is always a 4xx naming the field; only bugs become 500.
import type { FastifyError, FastifyInstance } from 'fastify';
import type { z } from 'zod';
import { CorralError } from '../core/errors.js';

export const apiErrorStatus = {
  CORRAL_API_BAD_REQUEST: 400,
  CORRAL_API_UNAUTHORIZED: 401,
  CORRAL_API_FORBIDDEN: 403,
  CORRAL_NOT_FOUND: 404,
  CORRAL_API_NOT_FOUND: 404,
  CORRAL_CONFLICT: 409,
  CORRAL_API_TOO_LARGE: 413,
  CORRAL_API_UNSUPPORTED_MEDIA: 415,
  CORRAL_API_TOO_MANY: 429,
  CORRAL_STORE_UNAVAILABLE: 503,
  CORRAL_STORE_TIMEOUT: 503,
  CORRAL_API_UNAVAILABLE: 503,
} as const;
export type ApiErrorCode = keyof typeof apiErrorStatus;

export interface ApiErrorBody {
  code: string;
  message: string;
  /** field path of the bad input ('' when it is not about one field) */
  path: string;
  hint?: string;
}

export class ApiError extends CorralError {
  constructor(
    override readonly code: ApiErrorCode,
    message: string,
    readonly path = '',
    hint?: string,
  ) {
    super(code, message, hint);
  }
  get status(): number {
    return apiErrorStatus[this.code];
  }
}

/** A zod failure as one 400 naming the first bad field (every issue is in the message). */
export function fromZod(where: 'body' | 'query' | 'params', err: z.ZodError): ApiError {
  const first = err.issues[0];
  const path = [where, ...(first?.path ?? [])].map(String).join('.');
  const msg = err.issues
    .slice(0, 5)
    .map((i) => `${[where, ...i.path].map(String).join('.')}: ${i.message}`)
    .join('; ');
  return new ApiError('CORRAL_API_BAD_REQUEST', msg, path, 'see /api/v1/openapi.json for the schema');
}

function isStatusCode(code: string): code is ApiErrorCode {
  return code in apiErrorStatus;
}

export function installErrorHandler(app: FastifyInstance): void {
  app.setNotFoundHandler((req, reply) => {
    void reply.code(404).send({
      code: 'CORRAL_API_NOT_FOUND',
      message: `no route ${req.method} ${req.url.split('?')[0]}`,
      path: '',
      hint: 'see /api/v1/openapi.json',
    } satisfies ApiErrorBody);
  });
  app.setErrorHandler((err: FastifyError | Error, req, reply) => {
    let status = 500;
    let body: ApiErrorBody;
    if (err instanceof ApiError) {
      status = err.status;
      body = { code: err.code, message: err.message, path: err.path, hint: err.hint };
    } else if (err instanceof CorralError) {
      status = isStatusCode(err.code) ? apiErrorStatus[err.code] : 400;
      body = { code: err.code, message: err.message, path: '', hint: err.hint };
    } else {
      const fe = err as FastifyError;
      const sc = fe.statusCode ?? 500;
      if (sc >= 400 && sc < 500) {
        status = sc;
        const code =
          sc === 413
            ? 'CORRAL_API_TOO_LARGE'
            : sc === 415
              ? 'CORRAL_API_UNSUPPORTED_MEDIA'
              : 'CORRAL_API_BAD_REQUEST';
        body = { code, message: fe.message, path: 'body' };
      } else {
        req.log.error({ err }, 'internal error');
        body = { code: 'CORRAL_API_INTERNAL', message: `internal error: ${err.message}`, path: '' };
      }
    }
    void reply.code(status).send(body);
  });
}
