// The module worker behind exportData(): runs the export off the page's
// thread and reports progress, the result or the error by message.
import init, { exportDataHere } from "./handover.js";

let controller = null;

self.onmessage = async (event) => {
  const msg = event.data ?? {};
  if (msg.type === "abort") {
    controller?.abort();
    return;
  }
  if (msg.type !== "start") return;
  controller = new AbortController();
  if (msg.aborted) controller.abort();
  try {
    await init();
    self.postMessage({ type: "started" });
    const result = await exportDataHere({
      ...msg.options,
      download: false,
      signal: controller.signal,
      onProgress: (progress) => self.postMessage({ type: "progress", progress }),
    });
    // Functions do not cross to the page; it makes its own release().
    delete result.release;
    // Nor do an Error's own fields: the page rebuilds the ExportError.
    if (result.copyError) result.copyError = plainError(result.copyError);
    self.postMessage({ type: "done", result });
  } catch (err) {
    self.postMessage({ type: "error", error: plainError(err) });
  }
};

function plainError(err) {
  return {
    code: err?.code ?? "WORKER_ERROR",
    message: String(err?.message ?? err),
    status: err?.status ?? null,
    retryAfter: err?.retryAfter ?? null,
    details: err?.details ?? null,
  };
}
