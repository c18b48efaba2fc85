//! Handing the finished file to the browser's download.

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{Blob, HtmlAnchorElement, Url};

use super::error::{export_error, make_error};

/// Starts the download of a finished export's file (its result's `blob`
/// as its `filename`).
///
/// # Errors
///
/// `DOWNLOAD_UNAVAILABLE`, with the export's result as `details.result`:
/// the file is complete and reported, and must not be lost with the
/// download (the page may offer it another way).
pub(crate) fn save_result(result: &JsValue) -> Result<(), JsValue> {
    let field = |k: &str| js_sys::Reflect::get(result, &k.into());
    let blob: Blob = field("blob")?.dyn_into()?;
    let filename = field("filename")?.as_string().unwrap_or_default();
    save(&blob, &filename).map_err(|e| {
        let message = js_sys::Reflect::get(&e, &"message".into())
            .ok()
            .and_then(|m| m.as_string())
            .unwrap_or_default();
        let details = js_sys::Object::new();
        let _ = js_sys::Reflect::set(&details, &"result".into(), result);
        make_error("DOWNLOAD_UNAVAILABLE", &message, None, None, details.into())
    })
}

/// Starts the download of `blob` as `filename` (object URL + anchor with
/// `download`), and revokes the URL once the click has been handled.
///
/// # Errors
///
/// `DOWNLOAD_UNAVAILABLE` outside a page (e.g. in a worker: pass `download: false`).
fn save(blob: &Blob, filename: &str) -> Result<(), JsValue> {
    start(blob, filename).map_err(|e| {
        if e.is_instance_of::<super::error::ExportError>() {
            e
        } else {
            // A DOMException of the page's (a sandboxed frame, say): callers
            // get an ExportError, as from every other failure.
            let why = js_sys::Reflect::get(&e, &"message".into())
                .ok()
                .and_then(|m| m.as_string())
                .unwrap_or_else(|| format!("{e:?}"));
            export_error(
                "DOWNLOAD_UNAVAILABLE",
                &format!("the browser refused the download: {why}"),
            )
        }
    })
}

fn start(blob: &Blob, filename: &str) -> Result<(), JsValue> {
    let window = web_sys::window().ok_or_else(|| {
        export_error(
            "DOWNLOAD_UNAVAILABLE",
            "downloads need a page; in a worker pass download: false",
        )
    })?;
    let document = window
        .document()
        .ok_or_else(|| export_error("DOWNLOAD_UNAVAILABLE", "this window has no document"))?;
    let url = Url::create_object_url_with_blob(blob)?;
    let anchor: HtmlAnchorElement = document.create_element("a")?.dyn_into()?;
    anchor.set_href(&url);
    anchor.set_download(filename);
    anchor.set_hidden(true);
    let body = document
        .body()
        .ok_or_else(|| export_error("DOWNLOAD_UNAVAILABLE", "the page has no body"))?;
    body.append_child(&anchor)?;
    anchor.click();
    body.remove_child(&anchor)?;
    // Revoke on the next turn, after the browser has taken the URL.
    let revoke = Closure::once_into_js(move || {
        let _ = Url::revoke_object_url(&url);
    });
    window.set_timeout_with_callback_and_timeout_and_arguments_0(revoke.unchecked_ref(), 1000)?;
    Ok(())
}
