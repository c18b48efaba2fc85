// The module worker behind exportDataInWorker(): runs exportData off the
// main thread and reports progress, the result or the error by message.
import init, { exportData } from "./handover.js";

let controller = null;

self.onmessage = async (event) => {
  const msg = event.data ?? {};
  if (msg.type === "abort") {
    controller?.abort();
    return;
  }
  if (msg.type !== "start") return;
  controller = new AbortController();
  try {
    await init();
    const result = await exportData({
      ...msg.options,
      download: false,
      signal: controller.signal,
      onProgress: (progress) => self.postMessage({ type: "progress", progress }),
    });
    self.postMessage({ type: "done", result });
  } catch (err) {
    self.postMessage({
      type: "error",
      error: {
        code: err?.code ?? "WORKER_ERROR",
        message: String(err?.message ?? err),
        status: err?.status ?? null,
        retryAfter: err?.retryAfter ?? null,
        details: err?.details ?? null,
      },
    });
  }
};
