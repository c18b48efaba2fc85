//! HTTP benchmarks of a running handover-server (see `scripts/bench.sh`).
//! Every figure is printed as one table row; times are wall-clock seconds.
//!
//! ```text
//! bench_http stream BASE TOKEN COMPANY ENCODING TYPE…   every record through the streams
//! bench_http pages  BASE TOKEN COMPANY ENCODING TYPE…   every record through pages of 5000
//! bench_http load   BASES TOKENS_FILE USERS [LABEL]     USERS users paging at once, spread
//!                                                        over the comma-separated BASES
//! bench_http convert BASE TOKEN COMPANY PID             server JSON build, then a CSV download
//! bench_http flood  BASE (TOKEN COMPANY)×4             an authenticated call's latency alone,
//!                                                        then during a flood of unauthenticated
//!                                                        requests: calls one after another, then
//!                                                        paced (a user each, so the per-user
//!                                                        read limit holds)
//! ```
//!
//! ENCODING is what `Accept-Encoding` asks for (`zstd`, `gzip`, `identity`);
//! bytes on the wire are counted as received, then decoded here.

use std::io::Read as _;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use handover::model::Manifest;
use serde_json::{json, Value};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Api {
    base: String,
    token: String,
    company: String,
    client: reqwest::Client,
}

impl Api {
    fn new(base: &str, token: &str, company: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            company: company.to_string(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(4)
                .build()
                .expect("a client"),
        }
    }

    fn get(&self, path: &str, encoding: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("x-company-id", &self.company)
            .header("accept-encoding", encoding)
    }

    async fn create(&self, body: Value) -> Result<Value, Error> {
        let r = self
            .client
            .post(format!("{}/api/data/export", self.base))
            .bearer_auth(&self.token)
            .header("x-company-id", &self.company)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status();
        let v: Value = serde_json::from_slice(&r.bytes().await?)?;
        if status != 201 {
            return Err(format!("create answered {status}: {v}").into());
        }
        Ok(v["data"].clone())
    }
}

/// Decodes a body received with `encoding`.
fn decode(encoding: &str, wire: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    match encoding {
        "zstd" => {
            zstd::stream::read::Decoder::new(wire)?.read_to_end(&mut out)?;
        }
        "gzip" => {
            flate2::read::GzDecoder::new(wire).read_to_end(&mut out)?;
        }
        _ => out.extend_from_slice(wire),
    }
    Ok(out)
}

/// Counts the rows of every frame in `text` (one frame per line).
fn count_rows(text: &[u8], manifest: &Manifest, data_type: &str) -> Result<u64, Error> {
    let columns = &manifest.types[data_type].columns;
    let mut rows = 0;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        rows += handover::wire::decode_frame(line, columns)?.row_count() as u64;
    }
    Ok(rows)
}

async fn client_export(api: &Api, types: &[String]) -> Result<(String, Manifest), Error> {
    let created = api
        .create(json!({ "export_format": "csv", "data_types": types, "delivery": "client" }))
        .await?;
    let id = created["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let manifest: Manifest = serde_json::from_value(created["manifest"].clone())?;
    Ok((id, manifest))
}

async fn stream(api: &Api, encoding: &str, types: &[String]) -> Result<(), Error> {
    let (id, manifest) = client_export(api, types).await?;
    let started = Instant::now();
    let (mut wire, mut plain, mut records) = (0u64, 0u64, 0u64);
    for t in types {
        let r = api
            .get(
                &format!("/api/data/export/{id}/records/{t}/stream?limit=5000"),
                encoding,
            )
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("stream of {t} answered {}", r.status()).into());
        }
        let mut body = Vec::new();
        let mut chunks = r.bytes_stream();
        while let Some(c) = chunks.next().await {
            body.extend_from_slice(&c?);
        }
        wire += body.len() as u64;
        let text = decode(encoding, &body)?;
        plain += text.len() as u64;
        records += count_rows(&text, &manifest, t)?;
    }
    report("stream", encoding, started.elapsed(), records, wire, plain);
    Ok(())
}

async fn pages(api: &Api, encoding: &str, types: &[String]) -> Result<(), Error> {
    let (id, manifest) = client_export(api, types).await?;
    let started = Instant::now();
    let (mut wire, mut plain, mut records) = (0u64, 0u64, 0u64);
    for t in types {
        let mut cursor = String::new();
        loop {
            let r = api
                .get(
                    &format!("/api/data/export/{id}/records/{t}?limit=5000&cursor={cursor}"),
                    encoding,
                )
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(format!("page of {t} answered {}", r.status()).into());
            }
            let body = r.bytes().await?;
            wire += body.len() as u64;
            let text = decode(encoding, &body)?;
            plain += text.len() as u64;
            let v: Value = serde_json::from_slice(&text)?;
            let frame = serde_json::to_vec(&v["data"])?;
            records += count_rows(&frame, &manifest, t)?;
            match v["data"]["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => break,
            }
        }
    }
    report(
        "pages of 5000",
        encoding,
        started.elapsed(),
        records,
        wire,
        plain,
    );
    Ok(())
}

fn report(path: &str, encoding: &str, took: Duration, records: u64, wire: u64, plain: u64) {
    let s = took.as_secs_f64();
    println!(
        "| {path} | {encoding} | {records} | {s:.2} | {:.0} | {:.1} | {:.1} |",
        records as f64 / s,
        wire as f64 / 1_048_576.0,
        plain as f64 / 1_048_576.0,
    );
}

/// USERS users at once, each creating a client export of every type and
/// paging through it (1000 records a page).
async fn load(bases: &str, tokens_file: &str, users: usize, label: &str) -> Result<(), Error> {
    let bases: Vec<String> = bases.split(',').map(str::to_string).collect();
    let tokens: Vec<(String, String)> = std::fs::read_to_string(tokens_file)?
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(t, c)| (t.to_string(), c.to_string()))
        })
        .take(users)
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (token, company)) in tokens.into_iter().enumerate() {
        let base = bases[i % bases.len()].clone();
        tasks.push(tokio::spawn(async move {
            let api = Api::new(&base, &token, &company);
            let mut latencies = Vec::new();
            let (mut records, mut errors) = (0u64, 0u64);
            let types: Vec<String> = [
                "user_profile",
                "payment_history",
                "membership_data",
                "recovery_cases",
                "consent_data",
            ]
            .map(String::from)
            .to_vec();
            let (id, manifest) = match client_export(&api, &types).await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("create failed: {e}");
                    return (latencies, 0, 1);
                }
            };
            for t in &types {
                let mut cursor = String::new();
                // Bounded: at most 10,000 pages per type.
                for _ in 0..10_000 {
                    let t0 = Instant::now();
                    let r = api
                        .get(
                            &format!(
                                "/api/data/export/{id}/records/{t}?limit=1000&cursor={cursor}"
                            ),
                            "zstd",
                        )
                        .send()
                        .await;
                    let body = match r {
                        Ok(r) if r.status().is_success() => r.bytes().await.ok(),
                        Ok(r) => {
                            eprintln!("page answered {}", r.status());
                            None
                        }
                        Err(e) => {
                            eprintln!("page failed: {e}");
                            None
                        }
                    };
                    latencies.push(t0.elapsed());
                    let Some(body) = body else {
                        errors += 1;
                        break;
                    };
                    let Ok(text) = decode("zstd", &body) else {
                        errors += 1;
                        break;
                    };
                    let v: Value = serde_json::from_slice(&text).unwrap_or_default();
                    let frame = serde_json::to_vec(&v["data"]).unwrap_or_default();
                    records += count_rows(&frame, &manifest, t).unwrap_or(0);
                    match v["data"]["next_cursor"].as_str() {
                        Some(c) => cursor = c.to_string(),
                        None => break,
                    }
                }
            }
            (latencies, records, errors)
        }));
    }
    let mut all = Vec::new();
    let (mut records, mut errors) = (0, 0);
    for t in tasks {
        let (l, r, e) = t.await?;
        all.extend(l);
        records += r;
        errors += e;
    }
    let took = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "| {label}{users} users paging (1000 a page) | {} | {records} | {took:.2} | {:.0} | {:.1} | {:.1} | {errors} |",
        all.len(),
        records as f64 / took,
        pct(0.5),
        pct(0.99),
    );
    Ok(())
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// A server-built JSON export, then its download as CSV (a conversion),
/// with the server's resident memory sampled throughout.
async fn convert(api: &Api, pid: u32) -> Result<(), Error> {
    let created = api
        .create(json!({ "export_format": "json", "data_types": ["payment_history"] }))
        .await?;
    let id = created["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let built = Instant::now();
    // Bounded wait for the build: 10 minutes.
    for _ in 0..6000 {
        let r = api
            .get(&format!("/api/data/export/{id}"), "identity")
            .send()
            .await?;
        let v: Value = serde_json::from_slice(&r.bytes().await?)?;
        match v["data"]["status"].as_str() {
            Some("completed") => break,
            Some("failed") => return Err("the build failed".into()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let build_s = built.elapsed().as_secs_f64();
    let before = rss_kb(pid, "VmRSS:");
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kb(pid, "VmRSS:"), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let r = api
        .get(
            &format!("/api/data/export/{id}/download?format=csv"),
            "identity",
        )
        .send()
        .await?;
    let mut bytes = 0u64;
    let mut chunks = r.bytes_stream();
    while let Some(c) = chunks.next().await {
        bytes += c?.len() as u64;
    }
    let took = started.elapsed().as_secs_f64();
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "| server JSON build, then download as CSV | {build_s:.2} | {took:.2} | {:.1} | {:.1} | {:.1} |",
        bytes as f64 / 1_048_576.0,
        before as f64 / 1024.0,
        peak.saturating_sub(before) as f64 / 1024.0,
    );
    Ok(())
}

/// One flooder: the same request, again and again, over a kept-alive
/// connection of its own (a new one when the server closes it), until
/// `stop`; bounded at 100,000 requests.
async fn flooder(
    addr: String,
    request: std::sync::Arc<[u8]>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    // A tarpitted answer takes about a second; a server that takes far
    // longer is stuck, and the flood goes on without it.
    const WAIT: Duration = Duration::from_secs(5);
    let mut connection = None;
    for _ in 0..100_000 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let stream = match connection.as_mut() {
            Some(s) => s,
            None => match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(s)) => connection.insert(s),
                _ => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match tokio::time::timeout(WAIT, exchange(stream, &request))
            .await
            .ok()
            .flatten()
        {
            Some(keep_alive) => {
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !keep_alive {
                    connection = None;
                }
            }
            None => connection = None,
        }
    }
}

/// Sends `request` on `stream` and reads its answer: whether the
/// connection stays open, or `None` when it failed. The server's answers
/// to it (401 and 429 errors, never compressed: the request accepts no
/// encoding) state their length.
async fn exchange(stream: &mut tokio::net::TcpStream, request: &[u8]) -> Option<bool> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(request).await.ok()?;
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 || stream.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    while buf.len() < head_end + length {
        if stream.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
    }
    Some(!head.contains("connection: close"))
}

/// p50 and p99 of `n` authenticated summary calls, in milliseconds: one
/// after another, or (`pace`) one starting every `pace`.
async fn authenticated_latency(
    api: &Api,
    n: usize,
    pace: Option<Duration>,
) -> Result<(f64, f64, u64), Error> {
    let mut ms = Vec::with_capacity(n);
    let mut errors = 0;
    let mut ticks = pace.map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    for _ in 0..n {
        if let Some(t) = ticks.as_mut() {
            t.tick().await;
        }
        let t0 = Instant::now();
        let r = api.get("/api/data/summary", "identity").send().await?;
        if !r.status().is_success() {
            errors += 1;
        }
        let _ = r.bytes().await?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    // BENCH_TRACE=1: which calls were slowest (their position says whether
    // a burst, a wave or a database checkpoint met them).
    if std::env::var_os("BENCH_TRACE").is_some() {
        let mut idx: Vec<(usize, f64)> = ms.iter().copied().enumerate().collect();
        idx.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!("slowest: {:?}", &idx[..5]);
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Ok((at(0.5), at(0.99), errors))
}

/// An authenticated call's latency alone, then while 32 clients flood the
/// API with unauthenticated requests with 30 KB paths (bounded: they stop
/// when the measurement ends), in two patterns: calls one after another
/// from the flood's first moment (its onset: the flooders connect and
/// send at once), then calls starting every 20 ms while the flood goes on
/// (its address is throttled by then, its answers held in the tarpit).
/// Each pattern is measured alone first, by another user (each stays under
/// the per-user limit of 120 reads a minute).
async fn flood(alone: [&Api; 2], during: [&Api; 2]) -> Result<(), Error> {
    const CALLS: usize = 100;
    const PACE: Duration = Duration::from_millis(20);
    // The throttle counts an address's failures per clock minute: the
    // whole run (about 5 s) stays within one, so that no new minute lets a
    // second onset into the paced phase.
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        % 60;
    if into_minute > 50 {
        tokio::time::sleep(Duration::from_secs(60 - into_minute)).await;
    }
    let (p50, p99, e) = authenticated_latency(alone[0], CALLS, None).await?;
    let (q50, q99, qe) = authenticated_latency(alone[1], CALLS, Some(PACE)).await?;
    // The users measured during the flood sign in before it starts, as
    // users who are already working would have.
    for api in during {
        let _ = api
            .get("/api/data/summary", "identity")
            .send()
            .await?
            .bytes()
            .await?;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The flooders run on a runtime of their own, in their own thread, as
    // an attacker is another program: sharing the measuring client's
    // scheduler would add their queueing to the measured calls.
    let base = alone[0].base.clone();
    if !base.starts_with("http://") || base["http://".len()..].contains('/') {
        return Err(
            format!("the flood needs a plain http://host:port base URL, not {base}").into(),
        );
    }
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the flooders");
            rt.block_on(async move {
                // Each flooder sends the same request, built once, over a
                // kept-alive connection of its own, as an attacker's tool
                // would: building it per request with an HTTP client
                // (parsing its 30 KB URL each time) took a third of this
                // machine's two cores at the onset, time that the
                // measured server then lacked.
                let addr = base.trim_start_matches("http://").to_string();
                let request: std::sync::Arc<[u8]> = format!(
                    "GET /api/data/export/{} HTTP/1.1\r\nHost: {addr}\r\n\
                     Authorization: Bearer hov_not_a_token\r\n\r\n",
                    "a".repeat(30_000)
                )
                .into_bytes()
                .into();
                let mut flooders = Vec::new();
                for _ in 0..32 {
                    let (stop, sent) = (stop.clone(), sent.clone());
                    let (addr, request) = (addr.clone(), request.clone());
                    flooders.push(tokio::spawn(flooder(addr, request, stop, sent)));
                }
                let _ = started_tx.send(());
                for f in flooders {
                    let _ = f.await;
                }
            });
        });
        let _ = started_rx.recv();
        thread
    };
    let (f50, f99, fe) = authenticated_latency(during[0], CALLS, None).await?;
    let at_onset = sent.load(std::sync::atomic::Ordering::Relaxed);
    let (g50, g99, ge) = authenticated_latency(during[1], CALLS, Some(PACE)).await?;
    // Before the flooders stop: those held in the tarpit are answered later.
    let total = sent.load(std::sync::atomic::Ordering::Relaxed);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || flood.join()).await;
    if total == 0 {
        return Err("the flood did not start: no request was answered".into());
    }
    let pace = PACE.as_millis();
    println!("| one after another, alone | {CALLS} | 0 | {p50:.1} | {p99:.1} | 1.00 | {e} |");
    println!(
        "| one after another, from the flood's onset | {CALLS} | {at_onset} | {f50:.1} | {f99:.1} | {:.2} | {fe} |",
        f99 / p99
    );
    println!("| one every {pace} ms, alone | {CALLS} | 0 | {q50:.1} | {q99:.1} | 1.00 | {qe} |");
    println!(
        "| one every {pace} ms, the flood going on | {CALLS} | {} | {g50:.1} | {g99:.1} | {:.2} | {ge} |",
        total - at_onset,
        g99 / q99
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "stream" => stream(&Api::new(&arg(1), &arg(2), &arg(3)), &arg(4), &args[5..]).await,
        "pages" => pages(&Api::new(&arg(1), &arg(2), &arg(3)), &arg(4), &args[5..]).await,
        "load" => load(&arg(1), &arg(2), arg(3).parse()?, &arg(4)).await,
        "convert" => convert(&Api::new(&arg(1), &arg(2), &arg(3)), arg(4).parse()?).await,
        "flood" => {
            let user = |i: usize| Api::new(&arg(1), &arg(2 * i + 2), &arg(2 * i + 3));
            let (a, b, c, d) = (user(0), user(1), user(2), user(3));
            flood([&a, &b], [&c, &d]).await
        }
        other => {
            Err(format!("unknown mode {other:?}: stream, pages, load, convert or flood").into())
        }
    }
}
