// The module worker behind exportData(): runs the export off the page's
// thread and reports progress, the result or the error by message.
//
// The page starts two of them for an export: this one fetches, decodes and
// writes the rows, and a second one (this same script, handed a
// MessagePort with "pack:port" and spoken to over it with "pack:"
// messages) assembles the file: the XLSX zip's deflate and CRC, the
// SHA-256, the OPFS or Blob storage. The two cores then share the work of
// one export. Without the second one, this one does it all.
import init, { exportDataHere, FilePacker, ExportError } from "./handover.js";
import { errorFrom } from "./export.js";

let controller = null;
/** The page's compiled module, when it sent one (see export.js). */
let module;
// A module that does not link with this glue (a page and a worker served
// from different builds) is dropped for the worker's own.
const initialised = () => (module ? init({ module_or_path: module }).catch(() => init()) : init());

// A message from the page that cannot be received (a module this browser
// cannot clone in): failing as a worker that did not load makes the page
// run the export itself, or the export's worker build the file itself.
self.onmessageerror = () => {
  throw new Error("a message from the page could not be received");
};

self.onmessage = (event) => {
  const msg = event.data ?? {};
  if (msg.type === "pack:port") {
    // This is the packing worker: its orders come over the port.
    const port = msg.port;
    module = msg.module;
    port.onmessage = (e) => {
      // pack() answers every message itself; the catch only keeps one
      // unexpected throw from stopping the queue (and the export's worker
      // waiting for ever).
      packing = packing.then(() => pack(e.data ?? {}, port)).catch(() => {});
    };
    return;
  }
  if (msg.type === "pack:gone") {
    link?.fail(new ExportError("WORKER_ERROR", msg.message), true);
    return;
  }
  if (msg.type === "abort") {
    controller?.abort();
    return;
  }
  if (msg.type === "start") run(msg);
};

/** The export's packing worker, while there is one. */
let link = null;

/** How often, at most, progress events go to the page. */
const PROGRESS_EVERY_MS = 50;

/**
 * Progress events for the page, posted together at most every
 * PROGRESS_EVERY_MS: the first at once, the ones that follow within that
 * time in one message after it. A message per page of records woke the
 * page's thread a few hundred times a second, and on a busy machine each
 * of those tasks is one the scheduler can pause half-way. The page calls
 * onProgress for every event, in order, as before.
 */
const progressPost = {
  pending: [],
  timer: null,
  add(progress) {
    this.pending.push(progress);
    if (this.timer === null) this.post(true);
  },
  /**
   * Posts what is pending. With `more`, events of the next
   * PROGRESS_EVERY_MS wait for the next message; without (before "done"
   * or "error"), nothing is posted later.
   */
  post(more) {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.pending.length === 0) return;
    self.postMessage({ type: "progress", events: this.pending });
    this.pending = [];
    if (more) this.timer = setTimeout(() => this.post(true), PROGRESS_EVERY_MS);
  },
};

async function run(msg) {
  module = msg.module;
  controller = new AbortController();
  if (msg.aborted) controller.abort();
  let packer = null;
  // The packing worker starts while this one does.
  const starting = msg.port ? PackingWorker.start(msg.port) : Promise.resolve(null);
  try {
    await initialised();
    packer = await starting;
    self.postMessage({ type: "started" });
    const result = await exportDataHere(
      {
        ...msg.options,
        download: false,
        signal: controller.signal,
        onProgress: (progress) => progressPost.add(progress),
      },
      packer ?? undefined,
    ).finally(() => progressPost.post(false));
    // Functions do not cross to the page; it makes its own release().
    delete result.release;
    // Nor do an Error's own fields: the page rebuilds the ExportError.
    if (result.copyError) result.copyError = plainError(result.copyError);
    self.postMessage({ type: "done", result });
  } catch (err) {
    self.postMessage({ type: "error", error: plainError(err) });
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

/** Chunks on their way to the packing worker before the writer waits. */
const MAX_IN_FLIGHT = 4;
/** Smallest chunk buffer: most chunks (one page) fit, so few are made. */
const MIN_BUFFER = 1 << 20;

/**
 * The export's handle on the packing worker: what exportDataHere calls
 * (open, write, finish, discard, bytesWritten). Requests are answered in
 * order; writes are acknowledged one by one, and the writer waits while
 * MAX_IN_FLIGHT of them are unanswered, so chunks do not pile up.
 */
class PackingWorker {
  /** The packing worker behind `port`, once it is ready; null if it cannot start. */
  static async start(port) {
    const packer = new PackingWorker(port);
    link = packer;
    try {
      await packer.request({ type: "pack:hello" });
      return packer;
    } catch {
      // Its script did not load (a bundler that did not ship it, a
      // content security policy): this worker builds the file itself.
      link = null;
      return null;
    }
  }

  constructor(port) {
    this.port = port;
    this.bytesWritten = 0;
    this.inFlight = 0;
    this.error = null;
    this.gone = false;
    this.waiting = null;
    this.replies = [];
    // Buffers the packing worker gave back, for the next chunks.
    this.pool = [];
    port.onmessage = (event) => this.receive(event.data ?? {});
  }

  receive(msg) {
    if (msg.type === "pack:ack") {
      this.inFlight -= 1;
      if (msg.buffer instanceof ArrayBuffer) {
        this.pool.push(msg.buffer);
        // No more than can be in flight at once: a larger one replaces the smallest.
        if (this.pool.length > MAX_IN_FLIGHT + 1) {
          this.pool.sort((a, b) => a.byteLength - b.byteLength).shift();
        }
      }
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

  /**
   * A chunk failed (the packing worker still answers every request, with
   * that error), or the worker is gone (nothing will answer): the writer
   * stops, and with `gone` every request waiting hears of it.
   */
  fail(err, gone = false) {
    this.error ??= err;
    this.gone ||= gone;
    this.waiting?.reject(this.error);
    this.waiting = null;
    if (gone) for (const r of this.replies.splice(0)) r.reject(this.error);
  }

  request(msg, transfer = []) {
    if (this.gone) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.replies.push({ resolve, reject });
      this.port.postMessage(msg, transfer);
    });
  }

  open(storage, name, mime, zip) {
    return this.request({ type: "pack:open", storage, name, mime, zip });
  }

  buffer(len) {
    const i = this.pool.findIndex((b) => b.byteLength >= len);
    const buf = i >= 0 ? this.pool.splice(i, 1)[0] : new ArrayBuffer(Math.max(len, MIN_BUFFER));
    return new Uint8Array(buf, 0, len);
  }

  write(chunk) {
    if (this.error) throw this.error;
    this.port.postMessage({ type: "pack:write", chunk }, [chunk.buffer]);
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
      if (this.gone) {
        resolve();
        return;
      }
      this.replies.push({ resolve, reject: resolve });
      this.port.postMessage({ type: "pack:discard" });
    });
  }
}

// The packing worker's side: one message at a time, in order.
let packing = Promise.resolve();
let file = null;
let failed = null;

async function pack(msg, port) {
  const reply = (value) => port.postMessage({ type: "pack:reply", ok: true, value });
  const refuse = (err) => port.postMessage({ type: "pack:reply", ok: false, error: plainError(err) });
  try {
    if (msg.type === "pack:hello") {
      await initialised();
      reply(null);
    } else if (msg.type === "pack:open") {
      file = await FilePacker.open(msg.storage, msg.name, msg.mime, msg.zip);
      failed = null;
      reply(null);
    } else if (msg.type === "pack:write") {
      try {
        if (failed) throw failed;
        if (!file) throw new ExportError("WORKER_ERROR", "no file is open in the packing worker");
        const bytes = file.write(msg.chunk);
        // The buffer goes back for the next chunk.
        const buffer = msg.chunk.buffer;
        port.postMessage({ type: "pack:ack", bytes, buffer }, [buffer]);
      } catch (err) {
        failed ??= err;
        port.postMessage({ type: "pack:ack", error: plainError(err) });
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
      try {
        await f?.discard();
      } catch {
        // The module trapped while it held the file: ending this worker
        // closes the file's handle, and the next export's sweep removes it.
        reply(null);
        self.close();
        return;
      }
      reply(null);
    }
  } catch (err) {
    refuse(err);
  }
}
