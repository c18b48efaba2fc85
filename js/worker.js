// The module worker behind exportData(): runs the export off the page's
// thread and reports progress, the result or the error by message.
//
// Where a worker can start a worker of its own, the export has two: this
// one fetches, decodes and writes the rows, and a second one (this same
// script, spoken to with "pack:" messages) assembles the file: the XLSX
// zip's deflate and CRC, the SHA-256, the OPFS or Blob storage. The two
// cores then share the work of one export.
import init, { exportDataHere, FilePacker, ExportError } from "./handover.js";

let controller = null;

self.onmessage = (event) => {
  const msg = event.data ?? {};
  if (typeof msg.type === "string" && msg.type.startsWith("pack:")) {
    packing = packing.then(() => pack(msg));
    return;
  }
  if (msg.type === "abort") {
    controller?.abort();
    return;
  }
  if (msg.type === "start") run(msg);
};

async function run(msg) {
  controller = new AbortController();
  if (msg.aborted) controller.abort();
  let packer = null;
  try {
    await init();
    packer = await PackingWorker.start();
    self.postMessage({ type: "started" });
    const result = await exportDataHere(
      {
        ...msg.options,
        download: false,
        signal: controller.signal,
        onProgress: (progress) => self.postMessage({ type: "progress", progress }),
      },
      packer ?? undefined,
    );
    // Functions do not cross to the page; it makes its own release().
    delete result.release;
    // Nor do an Error's own fields: the page rebuilds the ExportError.
    if (result.copyError) result.copyError = plainError(result.copyError);
    self.postMessage({ type: "done", result });
  } catch (err) {
    self.postMessage({ type: "error", error: plainError(err) });
  } finally {
    packer?.close();
  }
}

function plainError(err) {
  return {
    code: err?.code ?? "WORKER_ERROR",
    message: String(err?.message ?? err),
    status: err?.status ?? null,
    retryAfter: err?.retryAfter ?? null,
    details: err?.details ?? null,
  };
}

function errorFrom(e) {
  return new ExportError(e.code, e.message, { status: e.status ?? undefined, retryAfter: e.retryAfter ?? undefined, details: e.details });
}

/** Chunks on their way to the packing worker before the writer waits. */
const MAX_IN_FLIGHT = 4;

/**
 * The export's handle on the packing worker: what exportDataHere calls
 * (open, write, finish, discard, bytesWritten). Requests are answered in
 * order; writes are acknowledged one by one, and the writer waits while
 * MAX_IN_FLIGHT of them are unanswered, so chunks do not pile up.
 */
class PackingWorker {
  /** A started packing worker, or null where there can be none. */
  static async start() {
    if (typeof Worker === "undefined") return null;
    let worker;
    try {
      worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    } catch {
      return null;
    }
    const packer = new PackingWorker(worker);
    try {
      await packer.request({ type: "pack:hello" });
      return packer;
    } catch {
      // The script did not load there (no nested workers, a bundler that
      // did not ship it): this worker builds the file itself.
      packer.close();
      return null;
    }
  }

  constructor(worker) {
    this.worker = worker;
    this.bytesWritten = 0;
    this.inFlight = 0;
    this.error = null;
    this.waiting = null;
    this.replies = [];
    worker.onmessage = (event) => this.receive(event.data ?? {});
    worker.onerror = (event) => {
      event.preventDefault?.();
      this.fail(new ExportError("WORKER_ERROR", event.message || "the packing worker failed"));
    };
  }

  receive(msg) {
    if (msg.type === "pack:ack") {
      this.inFlight -= 1;
      if (msg.error) this.fail(errorFrom(msg.error));
      else this.bytesWritten = msg.bytes;
      if (this.waiting && this.inFlight < MAX_IN_FLIGHT) {
        const w = this.waiting;
        this.waiting = null;
        w.resolve();
      }
    } else if (msg.type === "pack:reply") {
      const r = this.replies.shift();
      if (msg.ok) r?.resolve(msg.value);
      else r?.reject(errorFrom(msg.error));
    }
  }

  /** The worker is gone or a chunk failed: everything waiting hears of it. */
  fail(err) {
    this.error ??= err;
    this.waiting?.reject(this.error);
    this.waiting = null;
    for (const r of this.replies.splice(0)) r.reject(this.error);
  }

  request(msg, transfer = []) {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.replies.push({ resolve, reject });
      this.worker.postMessage(msg, transfer);
    });
  }

  open(storage, name, mime, zip) {
    return this.request({ type: "pack:open", storage, name, mime, zip });
  }

  write(chunk) {
    if (this.error) throw this.error;
    this.worker.postMessage({ type: "pack:write", chunk }, [chunk.buffer]);
    this.inFlight += 1;
    if (this.inFlight < MAX_IN_FLIGHT) return undefined;
    return new Promise((resolve, reject) => { this.waiting = { resolve, reject }; });
  }

  finish() {
    return this.request({ type: "pack:finish" });
  }

  discard() {
    // After a failure too: the packing worker still removes the file.
    return new Promise((resolve) => {
      this.replies.push({ resolve, reject: resolve });
      this.worker.postMessage({ type: "pack:discard" });
    });
  }

  close() {
    this.worker.terminate();
  }
}

// The packing worker's side: one message at a time, in order.
let packing = Promise.resolve();
let file = null;
let failed = null;

async function pack(msg) {
  const reply = (value) => self.postMessage({ type: "pack:reply", ok: true, value });
  const refuse = (err) => self.postMessage({ type: "pack:reply", ok: false, error: plainError(err) });
  try {
    if (msg.type === "pack:hello") {
      await init();
      reply(null);
    } else if (msg.type === "pack:open") {
      file = await FilePacker.open(msg.storage, msg.name, msg.mime, msg.zip);
      failed = null;
      reply(null);
    } else if (msg.type === "pack:write") {
      try {
        if (failed) throw failed;
        if (!file) throw new ExportError("WORKER_ERROR", "no file is open in the packing worker");
        self.postMessage({ type: "pack:ack", bytes: file.write(msg.chunk) });
      } catch (err) {
        failed ??= err;
        self.postMessage({ type: "pack:ack", error: plainError(err) });
      }
    } else if (msg.type === "pack:finish") {
      const f = file;
      file = null;
      if (failed) {
        await f?.discard();
        throw failed;
      }
      if (!f) throw new ExportError("WORKER_ERROR", "no file is open in the packing worker");
      reply(await f.finish());
    } else if (msg.type === "pack:discard") {
      const f = file;
      file = null;
      await f?.discard();
      reply(null);
    }
  } catch (err) {
    refuse(err);
  }
}
