//! HTTP with fetch: retries with exponential backoff and jitter on network
//! errors and 5xx, waiting out 429s, and cancellation through the caller's
//! AbortSignal (which aborts the in-flight fetch too).

use js_sys::{Function, Promise, Reflect, Uint8Array};
use serde_json::Value;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortSignal, Request, RequestInit, Response};

use super::error::{export_error, make_error};

/// How a request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Safe to repeat: network errors and 5xx back off and retry; 429 waits.
    Idempotent,
    /// Creating an export: 5xx and network errors retry; a 429 is the
    /// user's answer ("try again at 14:05") and is not waited out.
    Create,
}

/// What a request sends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body<'a> {
    Json(&'a str),
    /// A part of an upload, starting at `offset` (`Upload-Offset`).
    Part {
        data: &'a [u8],
        offset: u64,
    },
}

#[derive(Debug)]
pub(crate) struct Client {
    pub base: String,
    pub token: String,
    pub company: String,
    pub signal: Option<AbortSignal>,
    pub max_attempts: u32,
    pub retry_base_ms: u32,
    pub max_retry_after_secs: u32,
    /// A request (headers and body) taking longer is aborted and retried.
    pub request_timeout_ms: u32,
    /// Sent with the create, the same on each retry of it: the server then
    /// creates one export however often the create is retried.
    pub idempotency_key: String,
}

/// A fresh `Idempotency-Key`: 128 random bits, hex.
pub(crate) fn new_idempotency_key() -> String {
    let mut bytes = [0u8; 16];
    // Without randomness the key would collide across calls: then send a
    // time-based key rather than none (the retry protection still holds).
    if getrandom::fill(&mut bytes).is_err() {
        let now = js_sys::Date::now().to_bits().to_le_bytes();
        bytes[..8].copy_from_slice(&now);
        let r = js_sys::Math::random().to_bits().to_le_bytes();
        bytes[8..].copy_from_slice(&r);
    }
    hex::encode(bytes)
}

/// The origin of a URL the browser resolved (a `Request`'s), if it has one.
fn origin_of(resolved: &str) -> Option<String> {
    web_sys::Url::new(resolved)
        .ok()
        .map(|u| u.origin())
        .filter(|o| o != "null")
}

enum Outcome {
    Reply {
        status: u16,
        body: Vec<u8>,
        retry_after: Option<f64>,
    },
    /// A 2xx whose body is read as it arrives.
    Stream(Stream),
    Network(String),
    Aborted,
}

/// Largest response body read whole (an answer that is not a stream).
const MAX_BODY_BYTES: usize = 64 << 20;

/// The body of an answer, read chunk by chunk. A stream times out when no
/// chunk arrives for the request timeout; a plain answer when it has not
/// fully arrived within the request timeout of its start.
pub(crate) struct Stream {
    reader: JsValue,
    guard: RequestGuard,
    signal: Option<AbortSignal>,
    /// Each chunk starts the timeout anew (streams only).
    idle_timeout: bool,
}

/// Why a stream stopped early.
pub(crate) enum StreamError {
    Aborted,
    Network(String),
}

impl Stream {
    /// The next chunk of the body; `None` at its end.
    pub(crate) async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StreamError> {
        let read: Function = Reflect::get(&self.reader, &"read".into())
            .and_then(|f| f.dyn_into::<Function>())
            .map_err(|_| StreamError::Network("the response body cannot be read".into()))?;
        let promise: Promise = read
            .call0(&self.reader)
            .map_err(|e| StreamError::Network(describe(&e)))?
            .unchecked_into();
        match JsFuture::from(promise).await {
            Ok(result) => {
                if self.idle_timeout {
                    let _ = self.guard.restart();
                }
                let done = Reflect::get(&result, &"done".into())
                    .ok()
                    .and_then(|d| d.as_bool())
                    .unwrap_or(true);
                if done {
                    return Ok(None);
                }
                let value = Reflect::get(&result, &"value".into()).unwrap_or(JsValue::UNDEFINED);
                Ok(Some(Uint8Array::new(&value).to_vec()))
            }
            Err(e) => {
                if self.signal.as_ref().is_some_and(AbortSignal::aborted) {
                    Err(StreamError::Aborted)
                } else if self.guard.timed_out.get() {
                    Err(StreamError::Network(format!(
                        "no answer within {} ms",
                        self.guard.timeout_ms
                    )))
                } else {
                    Err(StreamError::Network(format!(
                        "the connection broke while reading the response: {}",
                        describe(&e)
                    )))
                }
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Stop the download of whatever is left.
        if let Ok(cancel) =
            Reflect::get(&self.reader, &"cancel".into()).and_then(|f| f.dyn_into::<Function>())
        {
            if let Ok(p) = cancel.call0(&self.reader) {
                if let Ok(p) = p.dyn_into::<Promise>() {
                    // Awaited so that a rejected cancel is handled, not reported.
                    wasm_bindgen_futures::spawn_local(async move {
                        let _ = JsFuture::from(p).await;
                    });
                }
            }
        }
    }
}

pub(crate) fn aborted_error() -> JsValue {
    export_error("ABORTED", "the export was cancelled")
}

fn global_fn(name: &str) -> Result<Function, JsValue> {
    Reflect::get(&js_sys::global(), &name.into())?
        .dyn_into::<Function>()
        .map_err(|_| {
            export_error(
                "UNSUPPORTED_ENVIRONMENT",
                &format!("{name}() is not available here"),
            )
        })
}

/// Resolves after `ms`, or rejects with ABORTED when `signal` fires first.
pub(crate) async fn sleep(ms: f64, signal: Option<&AbortSignal>) -> Result<(), JsValue> {
    let set_timeout = global_fn("setTimeout")?;
    let signal = signal.cloned();
    let promise = Promise::new(&mut |resolve, reject| {
        if let Some(s) = &signal {
            if s.aborted() {
                let _ = reject.call1(&JsValue::NULL, &aborted_error());
                return;
            }
            let reject = reject.clone();
            let on_abort = Closure::once_into_js(move || {
                let _ = reject.call1(&JsValue::NULL, &aborted_error());
            });
            let opts = web_sys::AddEventListenerOptions::new();
            opts.set_once(true);
            let _ = s.add_event_listener_with_callback_and_add_event_listener_options(
                "abort",
                on_abort.unchecked_ref(),
                &opts,
            );
        }
        let _ = set_timeout.call2(&JsValue::NULL, &resolve, &JsValue::from_f64(ms));
    });
    JsFuture::from(promise).await.map(|_| ())
}

/// One request's own AbortController: fired by the caller's signal or by
/// the timeout. Dropping it removes the listener and clears the timer.
struct RequestGuard {
    controller: web_sys::AbortController,
    user_signal: Option<AbortSignal>,
    on_user_abort: Closure<dyn FnMut()>,
    on_timeout: Closure<dyn FnMut()>,
    timer: JsValue,
    timeout_ms: u32,
    timed_out: std::rc::Rc<std::cell::Cell<bool>>,
}

impl RequestGuard {
    fn new(user_signal: Option<&AbortSignal>, timeout_ms: u32) -> Result<Self, JsValue> {
        let controller = web_sys::AbortController::new()?;
        let timed_out = std::rc::Rc::new(std::cell::Cell::new(false));
        let on_timeout = {
            let (c, t) = (controller.clone(), timed_out.clone());
            Closure::<dyn FnMut()>::new(move || {
                t.set(true);
                c.abort();
            })
        };
        let on_user_abort = {
            let c = controller.clone();
            Closure::<dyn FnMut()>::new(move || c.abort())
        };
        if let Some(s) = user_signal {
            s.add_event_listener_with_callback("abort", on_user_abort.as_ref().unchecked_ref())?;
        }
        let timer = global_fn("setTimeout")?.call2(
            &JsValue::NULL,
            on_timeout.as_ref(),
            &JsValue::from(timeout_ms),
        )?;
        Ok(Self {
            controller,
            user_signal: user_signal.cloned(),
            on_user_abort,
            on_timeout,
            timer,
            timeout_ms,
            timed_out,
        })
    }

    /// Starts the timeout anew (a stream that keeps delivering is alive).
    fn restart(&mut self) -> Result<(), JsValue> {
        global_fn("clearTimeout")?.call1(&JsValue::NULL, &self.timer)?;
        self.timer = global_fn("setTimeout")?.call2(
            &JsValue::NULL,
            self.on_timeout.as_ref(),
            &JsValue::from(self.timeout_ms),
        )?;
        Ok(())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Ok(clear) = global_fn("clearTimeout") {
            let _ = clear.call1(&JsValue::NULL, &self.timer);
        }
        if let Some(s) = &self.user_signal {
            let _ = s.remove_event_listener_with_callback(
                "abort",
                self.on_user_abort.as_ref().unchecked_ref(),
            );
        }
    }
}

impl Client {
    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// Whether `request` goes to the server's origin: the bearer token is
    /// never sent anywhere else. A `Request` holds its URL as fetch
    /// resolves it: against the document's base URL in a page (an
    /// `about:blank` or `srcdoc` frame inherits its parent's; a `<base
    /// href>` counts), against its location in a worker, and read by the
    /// URL parser, which takes `/\host` and `/<tab>/host` for `//host`.
    fn on_our_origin(&self, request: &Request) -> bool {
        let base = if self.base.is_empty() {
            "/"
        } else {
            &self.base
        };
        let ours = Request::new_with_str(base)
            .ok()
            .and_then(|r| origin_of(&r.url()));
        matches!((ours, origin_of(&request.url())), (Some(a), Some(b)) if a == b)
    }

    fn is_aborted(&self) -> bool {
        self.signal.as_ref().is_some_and(AbortSignal::aborted)
    }

    async fn once(
        &self,
        method: &str,
        path: &str,
        body: Option<Body<'_>>,
        stream: bool,
    ) -> Result<Outcome, JsValue> {
        let init = RequestInit::new();
        init.set_method(method);
        match body {
            Some(Body::Json(text)) => init.set_body(&JsValue::from_str(text)),
            Some(Body::Part { data, .. }) => init.set_body(&Uint8Array::from(data).into()),
            None => {}
        }
        let guard = RequestGuard::new(self.signal.as_ref(), self.request_timeout_ms)?;
        init.set_signal(Some(&guard.controller.signal()));
        let url = self.url(path);
        let request = Request::new_with_str_and_init(&url, &init).map_err(|_| {
            export_error(
                "INVALID_OPTIONS",
                &format!("cannot make a request to {url}"),
            )
        })?;
        if !self.on_our_origin(&request) {
            return Err(export_error(
                "INVALID_RESPONSE",
                &format!(
                    "a request for {path} would leave the server's origin ({}), and the token is only sent there",
                    if self.base.is_empty() { "this page's" } else { &self.base }
                ),
            ));
        }
        let headers = request.headers();
        // parse_options keeps both to printable ASCII; should a browser
        // still refuse one, the caller gets an ExportError all the same.
        let unsendable = |_| {
            export_error(
                "INVALID_OPTIONS",
                "the token or companyId cannot be sent in a header",
            )
        };
        headers
            .set("Authorization", &format!("Bearer {}", self.token))
            .map_err(unsendable)?;
        headers
            .set("X-Company-ID", &self.company)
            .map_err(unsendable)?;
        headers.set("Accept", "application/json")?;
        match body {
            Some(Body::Json(_)) => headers.set("Content-Type", "application/json")?,
            Some(Body::Part { offset, .. }) => {
                headers.set("Content-Type", "application/octet-stream")?;
                headers.set("Upload-Offset", &offset.to_string())?;
            }
            None => {}
        }
        if method == "POST" && path == "/api/data/export" {
            headers.set("Idempotency-Key", &self.idempotency_key)?;
        }
        let fetch = global_fn("fetch")?;
        let promise: Promise = fetch.call1(&js_sys::global(), &request)?.unchecked_into();
        let response: Response = match JsFuture::from(promise).await {
            Ok(r) => r.unchecked_into(),
            Err(e) => return Ok(self.failed(&guard, &e)),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("Retry-After")
            .ok()
            .flatten()
            .and_then(|v| v.trim().parse::<f64>().ok());
        if stream && (200..300).contains(&status) {
            let reader = response
                .body()
                .map(|b| b.get_reader())
                .ok_or_else(|| export_error("INVALID_RESPONSE", "the answer has no body"))?;
            return Ok(Outcome::Stream(Stream {
                reader: reader.into(),
                guard,
                signal: self.signal.clone(),
                idle_timeout: true,
            }));
        }
        if let Some(len) = response
            .headers()
            .get("Content-Length")
            .ok()
            .flatten()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            if len > MAX_BODY_BYTES {
                return Err(export_error(
                    "INVALID_RESPONSE",
                    &format!("the server's answer is too large ({len} bytes)"),
                ));
            }
        }
        // Read the body as bytes (records are parsed in Rust, never as JS
        // objects), chunk by chunk, so that an answer without a length is
        // refused once it passes the cap rather than held whole first.
        let Some(reader) = response.body().map(|b| b.get_reader()) else {
            return Ok(Outcome::Reply {
                status,
                body: Vec::new(),
                retry_after,
            });
        };
        let mut body = Stream {
            reader: reader.into(),
            guard,
            signal: self.signal.clone(),
            idle_timeout: false,
        };
        let mut bytes = Vec::new();
        loop {
            match body.next_chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(export_error(
                            "INVALID_RESPONSE",
                            &format!(
                                "the server's answer is too large (over {MAX_BODY_BYTES} bytes)"
                            ),
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(StreamError::Aborted) => return Ok(Outcome::Aborted),
                Err(StreamError::Network(msg)) => return Ok(Outcome::Network(msg)),
            }
        }
        Ok(Outcome::Reply {
            status,
            body: bytes,
            retry_after,
        })
    }

    fn failed(&self, guard: &RequestGuard, e: &JsValue) -> Outcome {
        if self.is_aborted() {
            Outcome::Aborted
        } else if guard.timed_out.get() {
            Outcome::Network(format!("no answer within {} ms", self.request_timeout_ms))
        } else {
            Outcome::Network(describe(e))
        }
    }

    /// Sends a request, retrying as `retry` allows; returns the body of the
    /// 2xx answer.
    ///
    /// # Errors
    ///
    /// `ExportError`: the server's code for a refused request, `ABORTED`,
    /// or `NETWORK_ERROR` / the last 5xx code when retries are exhausted.
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        retry: Retry,
    ) -> Result<Vec<u8>, JsValue> {
        match self
            .request(method, path, body.map(Body::Json), retry, false)
            .await?
        {
            Outcome::Reply { body, .. } => Ok(body),
            _ => Err(export_error("INVALID_RESPONSE", "unexpected answer")),
        }
    }

    /// Sends one part of an upload (`PATCH`), retried like an idempotent
    /// request: the server refuses a part it already has
    /// (`UPLOAD_OFFSET_MISMATCH`), so a repeat never stores bytes twice.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub(crate) async fn send_part(
        &self,
        path: &str,
        data: &[u8],
        offset: u64,
    ) -> Result<Vec<u8>, JsValue> {
        let body = Some(Body::Part { data, offset });
        match self
            .request("PATCH", path, body, Retry::Idempotent, false)
            .await?
        {
            Outcome::Reply { body, .. } => Ok(body),
            _ => Err(export_error("INVALID_RESPONSE", "unexpected answer")),
        }
    }

    /// Opens a streamed `GET`, retried like [`send`](Self::send) until the
    /// server answers 2xx; the body is then read with [`Stream::next_chunk`].
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub(crate) async fn open_stream(&self, path: &str) -> Result<Stream, JsValue> {
        match self
            .request("GET", path, None, Retry::Idempotent, true)
            .await?
        {
            Outcome::Stream(s) => Ok(s),
            _ => Err(export_error("INVALID_RESPONSE", "unexpected answer")),
        }
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Body<'_>>,
        retry: Retry,
        stream: bool,
    ) -> Result<Outcome, JsValue> {
        let mut attempt = 0;
        let mut waits_429 = 0;
        loop {
            if self.is_aborted() {
                return Err(aborted_error());
            }
            attempt += 1;
            let outcome = self.once(method, path, body, stream).await?;
            let last_error = match outcome {
                Outcome::Aborted => return Err(aborted_error()),
                s @ Outcome::Stream(_) => return Ok(s),
                r @ Outcome::Reply { status, .. } if (200..300).contains(&status) => return Ok(r),
                Outcome::Reply {
                    status: 429,
                    body,
                    retry_after,
                } => {
                    let wait = retry_after.unwrap_or(1.0).max(0.0);
                    if retry == Retry::Create
                        || wait > f64::from(self.max_retry_after_secs)
                        || waits_429 >= 20
                    {
                        return Err(server_error(429, &body, retry_after));
                    }
                    waits_429 += 1;
                    attempt -= 1; // waiting out a rate limit is not a failed attempt
                    sleep(wait * 1000.0, self.signal.as_ref()).await?;
                    continue;
                }
                Outcome::Reply {
                    status,
                    body,
                    retry_after,
                } if status >= 500 => server_error(status, &body, retry_after),
                Outcome::Reply {
                    status,
                    body,
                    retry_after,
                } => return Err(server_error(status, &body, retry_after)),
                Outcome::Network(msg) => export_error(
                    "NETWORK_ERROR",
                    &format!("could not reach the export server: {msg}"),
                ),
            };
            if attempt >= self.max_attempts {
                return Err(last_error);
            }
            // Exponential backoff with jitter: base · 2^(n-1) · [0.5, 1).
            let base = f64::from(self.retry_base_ms) * 2f64.powi(attempt as i32 - 1);
            let delay = (base * (0.5 + js_sys::Math::random() * 0.5)).min(30_000.0);
            sleep(delay, self.signal.as_ref()).await?;
        }
    }
}

fn describe(e: &JsValue) -> String {
    Reflect::get(e, &"message".into())
        .ok()
        .and_then(|m| m.as_string())
        .or_else(|| e.as_string())
        .unwrap_or_else(|| "network error".into())
}

/// An `ExportError` from the server's error envelope.
fn server_error(status: u16, body: &[u8], retry_after: Option<f64>) -> JsValue {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let code = e["code"].as_str().unwrap_or(match status {
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        429 => "RATE_LIMIT_EXCEEDED",
        500..=599 => "SERVER_ERROR",
        _ => "HTTP_ERROR",
    });
    let message = e["error"].as_str().map_or_else(
        || format!("the export server answered {status}"),
        str::to_string,
    );
    let details =
        serde::Serialize::serialize(e, &serde_wasm_bindgen::Serializer::json_compatible())
            .unwrap_or(JsValue::NULL);
    make_error(code, &message, Some(status), retry_after, details)
}
