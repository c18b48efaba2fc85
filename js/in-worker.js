// exportDataInWorker(options): exportData in a module Web Worker so the page
// stays responsive. Same options and result as exportData; onProgress and
// the result arrive on this thread, which also starts the download.
import { ExportError } from "./handover.js";

function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function exportDataInWorker(options) {
  const { onProgress, signal, download = true, ...rest } = options ?? {};
  return new Promise((resolve, reject) => {
    if (onProgress !== undefined && typeof onProgress !== "function") {
      reject(new ExportError("INVALID_OPTIONS", "options.onProgress must be a function"));
      return;
    }
    if (signal?.aborted) {
      reject(new ExportError("ABORTED", "the export was cancelled"));
      return;
    }
    const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    const onAbort = () => worker.postMessage({ type: "abort" });
    const finish = () => {
      signal?.removeEventListener("abort", onAbort);
      worker.terminate();
    };
    signal?.addEventListener("abort", onAbort);
    worker.onmessage = (event) => {
      const msg = event.data;
      if (msg.type === "progress") {
        try { onProgress?.(msg.progress); } catch { /* a throwing callback must not break the export */ }
      } else if (msg.type === "done") {
        finish();
        try {
          if (download) saveBlob(msg.result.blob, msg.result.filename);
          resolve(msg.result);
        } catch (e) {
          reject(new ExportError("DOWNLOAD_UNAVAILABLE", String(e?.message ?? e)));
        }
      } else if (msg.type === "error") {
        finish();
        const e = msg.error;
        reject(new ExportError(e.code, e.message, { status: e.status ?? undefined, retryAfter: e.retryAfter ?? undefined, details: e.details }));
      }
    };
    worker.onerror = (event) => {
      finish();
      reject(new ExportError("WORKER_ERROR", event.message || "the export worker failed to start"));
    };
    worker.postMessage({ type: "start", options: rest });
  });
}
