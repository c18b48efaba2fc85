//! The HTTP server loop: axum's router on hyper, with what `axum::serve`
//! does not set: a timeout for reading request headers (a client that
//! trickles them in, sends nothing at all, or idles on a kept-alive
//! connection holds nothing for long) and a cap on open connections (past
//! it, new connections wait in the kernel's backlog). Shutdown stops
//! accepting and lets requests in flight finish (30 s at most).
//!
//! HTTP/1.1 only: hyper's HTTP/2 has no header timeout, and a connection
//! whose protocol is still being sniffed has none either (a client that
//! connects and stays silent would hold its place forever). TLS and
//! HTTP/2 belong to the reverse proxy in front.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::{Service as _, ServiceExt as _};

/// Limits on clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` completes.
///
/// # Errors
///
/// None so far (accept errors are logged and skipped); kept for the future.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut make = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = make
            .call(addr)
            .await
            .unwrap_or_else(|e: Infallible| match e {});
        let service = TowerToHyperService::new(
            service.map_request(|req: hyper::Request<Incoming>| req.map(axum::body::Body::new)),
        );
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %addr, "connection ended with an error");
            }
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(30)) => {
            tracing::warn!("requests still running after 30 s; stopping anyway");
        }
    }
    Ok(())
}
