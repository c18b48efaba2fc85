// The package's error class. Defined in JavaScript so that it is a real
// Error subclass: `instanceof ExportError` and `instanceof Error` both hold,
// and the stack trace is the engine's own.
export class ExportError extends Error {
  constructor(code, message, options = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "ExportError";
    /** Stable machine-readable code, e.g. "RATE_LIMIT_EXCEEDED", "ABORTED". */
    this.code = code;
    /** HTTP status of the response that caused it, or null. */
    this.status = options.status ?? null;
    /** Seconds to wait before trying again (rate limits), or null. */
    this.retryAfter = options.retryAfter ?? null;
    /** Extra machine-readable context (e.g. the offending field), or null. */
    this.details = options.details ?? null;
  }
}

export function makeExportError(code, message, status, retryAfter, details) {
  return new ExportError(code, message, {
    status: status ?? null,
    retryAfter: retryAfter ?? null,
    details: details ?? null,
  });
}
