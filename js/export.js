// exportData(options): the export runs in a module worker where the browser
// has one, so the page only ever handles progress messages; elsewhere (and
// with `worker: false`) it runs on the calling thread. Progress, cancel,
// retries, the result and the download behave the same either way.
import { exportDataHere, checkExportOptions, ExportError, compiledWasmModule } from "./handover.js";

/** The module this page compiled, for the workers; undefined where it cannot be had. */
function compiledModule() {
  try {
    const module = compiledWasmModule();
    return module instanceof WebAssembly.Module ? module : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Posts `msg` with the compiled module beside it, or without it where the
 * browser cannot clone a module to a worker (the worker then loads its own).
 */
function postWithModule(target, msg, transfer, module) {
  if (module) {
    try {
      target.postMessage({ ...msg, module }, transfer);
      return;
    } catch (e) {
      if (e?.name !== "DataCloneError") throw e;
    }
  }
  target.postMessage(msg, transfer);
}

const OPFS_DIR = "handover";

/** Whether this context can start module workers. */
function moduleWorkers() {
  if (typeof Worker === "undefined" || typeof window === "undefined") return false;
  let supported = false;
  try {
    // A browser that knows module workers reads `type`; the data URL is never fetched.
    new Worker("data:text/javascript,", { get type() { supported = true; return "module"; } }).terminate();
  } catch {
    return false;
  }
  return supported;
}

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

async function removeOpfsFile(name) {
  if (!name) return;
  try {
    const root = await navigator.storage.getDirectory();
    const dir = await root.getDirectoryHandle(OPFS_DIR);
    await dir.removeEntry(name);
  } catch {
    // Already gone, or no OPFS here.
  }
}

/** The ExportError a worker sent as a plain object (worker.js uses it too). */
export function errorFrom(e) {
  return new ExportError(e.code, e.message, { status: e.status ?? undefined, retryAfter: e.retryAfter ?? undefined, details: e.details });
}

/**
 * Runs the export in a module worker. Resolves to undefined when the worker
 * could not start before the export began (the caller then runs it here).
 */
function inWorker(options) {
  const { onProgress, signal, download = true, releaseFileAfterMs = 60_000, worker: _worker, ...rest } = options;
  return new Promise((resolve, reject) => {
    let worker;
    try {
      worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    } catch {
      resolve(undefined);
      return;
    }
    // A second worker builds the file beside the first (see worker.js);
    // they talk over their own channel. Without it, the first builds it.
    let packer = null;
    let channel = null;
    const module = compiledModule();
    try {
      packer = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
      channel = new MessageChannel();
      packer.onerror = (event) => {
        event.preventDefault?.();
        worker.postMessage({ type: "pack:gone", message: event.message || "the packing worker failed" });
      };
      postWithModule(packer, { type: "pack:port", port: channel.port2 }, [channel.port2], module);
    } catch {
      packer?.terminate();
      packer = null;
      channel = null;
    }
    let started = false;
    const onAbort = () => worker.postMessage({ type: "abort" });
    const finish = () => {
      signal?.removeEventListener("abort", onAbort);
      worker.terminate();
      packer?.terminate();
    };
    signal?.addEventListener("abort", onAbort);
    worker.onmessage = (event) => {
      const msg = event.data ?? {};
      if (msg.type === "started") {
        started = true;
      } else if (msg.type === "progress") {
        // The worker sends the events of up to 50 ms together (see
        // worker.js; a worker of an older build sends one). None is passed
        // on once the caller has cancelled, as on the calling thread.
        for (const progress of msg.events ?? [msg.progress]) {
          if (signal?.aborted) break;
          try { onProgress?.(progress); } catch { /* a throwing callback must not break the export */ }
        }
      } else if (msg.type === "done") {
        finish();
        const result = msg.result;
        if (result.copyError) result.copyError = errorFrom(result.copyError);
        const name = result.stats?.opfsName ?? null;
        result.release = () => removeOpfsFile(name);
        if (!download) {
          resolve(result);
          return;
        }
        // The browser reads the file while it downloads; then it goes.
        if (name) setTimeout(() => removeOpfsFile(name), releaseFileAfterMs);
        try {
          saveBlob(result.blob, result.filename);
          resolve(result);
        } catch (e) {
          // The export is complete and reported: its file stays with the
          // error, as on the calling thread, for the page to offer otherwise.
          reject(new ExportError("DOWNLOAD_UNAVAILABLE", `the browser refused the download: ${e?.message ?? e}`,
            { details: { result } }));
        }
      } else if (msg.type === "error") {
        finish();
        reject(errorFrom(msg.error));
      }
    };
    worker.onerror = (event) => {
      finish();
      if (!started) {
        // The worker script did not load (a bundler that did not ship it,
        // a content security policy): nothing was asked of the server yet.
        event.preventDefault?.();
        resolve(undefined);
      } else {
        reject(new ExportError("WORKER_ERROR", event.message || "the export worker failed"));
      }
    };
    try {
      const port = channel?.port1;
      postWithModule(worker, { type: "start", options: rest, aborted: signal?.aborted ?? false, port }, port ? [port] : [], module);
    } catch (e) {
      finish();
      reject(new ExportError("INVALID_OPTIONS", `options cannot be sent to the export worker: ${e?.message ?? e}`));
    }
  });
}

/** See the TypeScript declaration of exportData. */
export async function exportData(options) {
  // The same checks, and the same errors, as on the calling thread.
  checkExportOptions(options);
  if (options.signal?.aborted) throw new ExportError("ABORTED", "the export was cancelled");
  // A copy's link leads back to this page (a worker only knows its own script's address).
  if (options.keepCopy && options.copyLinkBase === undefined && typeof location !== "undefined") {
    options = { ...options, copyLinkBase: location.href.split("#")[0] };
  }
  if (options.worker !== false && moduleWorkers()) {
    // A worker would resolve a relative baseUrl against its own script's
    // address; requests go where they would from this page (its base URL).
    const base = options.baseUrl ?? "";
    if (typeof document !== "undefined" && !/^https?:\/\//i.test(base)) {
      try {
        const here = new URL(base === "" ? "/" : base, document.baseURI);
        if (here.origin !== "null") {
          options = { ...options, baseUrl: base === "" ? here.origin : here.href };
        }
      } catch {
        // Not resolvable here (a blob: page, say): the worker reports it.
      }
    }
    const result = await inWorker(options);
    if (result !== undefined) return result;
  }
  return exportDataHere(options);
}

/** exportData in a module worker (`worker: true`), kept for existing callers. */
export function exportDataInWorker(options) {
  return exportData({ ...(options ?? {}), worker: true });
}
