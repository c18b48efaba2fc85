//! Putting the server together: the database, the data types, the keys and
//! the file store become an [`AppState`]; `serve` runs the HTTP API and the
//! background work on it until a signal stops it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::auth::{self, AuthConfig};
use crate::config::{self, JwtSettings, MasterKeySource};
use crate::cursor::CursorKey;
use crate::datatypes::Registry;
use crate::files::FileStore;
use crate::source::Source;
use crate::store::Store;
use crate::{demo, jobs, AppState, Settings, StateInner};

/// What an [`AppState`] is made of.
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `HANDOVER_DATA_TYPES`; the built-in config for the engine otherwise.
    pub data_types: Option<PathBuf>,
    /// `HANDOVER_DATA_DIR`: export files (directory storage) and build scratch space.
    pub data_dir: PathBuf,
    pub master_key: MasterKeySource,
    /// `HANDOVER_FILE_STORAGE`.
    pub file_storage: Option<String>,
    pub jwt: JwtSettings,
    pub dev_no_auth: bool,
    pub settings: Settings,
    /// `HANDOVER_AUDIT_HEAD_FILE`: each new audit head is appended there.
    pub audit_head_file: Option<PathBuf>,
    /// Append only to a head file that exists (an operator's command): the
    /// server creates it, as its own user.
    pub audit_head_file_exists: bool,
}

/// The store, with the audit chain keyed by the master key and its heads
/// written to the head file.
async fn keyed_store(
    o: &StateOptions,
    master: &handover::crypto::DataKey,
) -> anyhow::Result<Store> {
    let store = Store::connect(&o.database_url).await?;
    store.check_master_key(master, true).await?;
    let mut store = store.with_master_key(master);
    match &o.audit_head_file {
        Some(f) if o.audit_head_file_exists => store = store.with_existing_head_file(f.clone()),
        Some(f) => {
            if let Some(dir) = f.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!("HANDOVER_AUDIT_HEAD_FILE: creating {}", dir.display())
                })?;
            }
            warn_of_a_foreign_head(&store, f).await;
            store = store.with_head_file(f.clone());
        }
        None => {}
    }
    Ok(store)
}

/// Says so when the head file's newest head is not a row of this database
/// (or it holds no head at all, though it is not empty).
/// Appending goes on (refusing to start would let whoever can alter the
/// database stop the server), but every later `audit verify` fails until
/// the file is set aside, as it must be after a restore from a backup.
async fn warn_of_a_foreign_head(store: &Store, file: &std::path::Path) {
    use crate::store::audit::HeadFileState;
    match store.head_file_state(file).await {
        Ok(HeadFileState::Foreign { seq }) => tracing::warn!(
            file = %file.display(),
            row = seq,
            "the audit head file records a row this database does not hold as recorded: \
             if the database was restored or replaced, move the head file aside (keep it) \
             and restart; otherwise the log was altered, which `handover-server audit verify` shows"
        ),
        Ok(HeadFileState::NoWholeHead) => tracing::warn!(
            file = %file.display(),
            "the audit head file holds no whole head: is HANDOVER_AUDIT_HEAD_FILE the right file?"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "the audit head file cannot be read")
        }
    }
}

/// Opens everything and returns the state the handlers and workers share.
///
/// # Errors
///
/// Any setting that does not check out (each error names its variable),
/// or a database that cannot be opened or migrated.
pub async fn open_state(o: StateOptions) -> anyhow::Result<AppState> {
    let exports_dir = o.data_dir.join("exports");
    let master = config::master_key(&o.master_key, Some(&exports_dir))?;
    let store = keyed_store(&o, &master).await?;
    let sealed = store.seal_clear_webhook_secrets().await?;
    if sealed > 0 {
        tracing::info!(
            sealed,
            "webhook secrets stored in clear by an older version are now sealed"
        );
    }
    let registry = Registry::load_for(o.data_types.as_deref(), store.engine())?;
    if o.data_types.is_none() {
        // The built-in config reads the demo tables: without them (a fresh
        // database, no demo data loaded) every create would fail. Empty,
        // they give each user no records, as the design says; and an
        // operator who forgot their own config is told so at once.
        let missing = store
            .execute_script("SELECT 1 FROM demo_users WHERE 1 = 0")
            .await
            .is_err();
        if let Some(demo) = registry.demo.as_ref().filter(|_| missing) {
            tracing::warn!(
                "HANDOVER_DATA_TYPES is not set, so the built-in demo data types are used, and this database has none of their tables: they are created empty, and every export is empty until demo data is loaded. Set HANDOVER_DATA_TYPES to export your own tables."
            );
            if let Err(e) = store.execute_script(&demo.schema).await {
                tracing::warn!(error = %format!("{e:#}"), "creating the built-in config's tables failed");
            }
        }
    }
    let storage = config::file_storage(o.file_storage.as_deref(), store.engine())?;
    let files = FileStore::new(exports_dir, master.clone(), storage, store.clone())?;
    let source = Source::open(&o.database_url, &registry)?;
    Ok(AppState(Arc::new(StateInner {
        store,
        registry,
        source,
        cursor_key: CursorKey::derive(&master),
        auth: AuthConfig {
            jwt: o.jwt.build()?,
            dev_no_auth: o.dev_no_auth,
        },
        metrics: Default::default(),
        files,
        settings: o.settings,
        jobs: Default::default(),
        guard: Default::default(),
    })))
}

/// The demo: data loaded into an empty database, and a token for the page.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    pub users: u64,
    pub records: u64,
}

/// Runs the API on `bind` until SIGINT/SIGTERM.
///
/// # Errors
///
/// Startup errors (settings, database, an address that cannot be bound, a
/// development switch on a public address).
pub async fn serve(
    mut o: StateOptions,
    bind: &str,
    demo_opts: Option<DemoOptions>,
) -> anyhow::Result<()> {
    if o.dev_no_auth {
        let loopback = bind
            .parse::<SocketAddr>()
            .map(|a| a.ip().is_loopback())
            .unwrap_or_else(|_| bind.starts_with("localhost:"));
        anyhow::ensure!(
            loopback,
            "HANDOVER_DEV_NO_AUTH accepts requests without a token, so it only runs on a loopback address (127.0.0.1 or ::1); HANDOVER_BIND is {bind}"
        );
        for _ in 0..3 {
            tracing::warn!("HANDOVER_DEV_NO_AUTH is on: requests WITHOUT a token are accepted as any user. NEVER use this in production.");
        }
    }
    let demo_token = if let Some(d) = demo_opts {
        // Loaded before the state exists, so the first request sees it.
        let master = config::master_key(&o.master_key, None)?;
        let store = keyed_store(&o, &master).await?;
        let registry = Registry::load_for(o.data_types.as_deref(), store.engine())?;
        if !demo::has_data(&store, &registry).await {
            let loaded =
                demo::load(&store, &o.database_url, &registry, d.users, d.records, 42).await?;
            tracing::info!(
                users = loaded.users,
                records = loaded.records,
                "loaded demo data"
            );
        }
        let (_, token) = auth::create_demo_token(&store).await?;
        store.close().await;
        Some(token)
    } else {
        None
    };
    o.settings.demo_token = demo_token.clone();
    let state = open_state(o).await?;
    jobs::spawn(state.clone());
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("HANDOVER_BIND: cannot listen on {bind}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, engine = ?state.store.engine(), "handover-server listening");
    if let Some(token) = &demo_token {
        println!(
            "\n  handover demo: http://{addr}/\n  demo token (user_456, company_123): {token}\n"
        );
    }
    let limits = crate::listen::Limits {
        header_timeout: state.settings.header_timeout,
        max_connections: state.settings.max_connections,
    };
    crate::listen::serve(listener, crate::app(state.clone()), limits, shutdown()).await?;
    // The refusals counted this minute are written before the process
    // ends, not lost with it.
    // Bounded: an unreachable database must not hold the process.
    let flush = crate::context::write_tallies(&state, state.guard.take_all());
    match tokio::time::timeout(std::time::Duration::from_secs(10), flush).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "writing refusal counts failed"),
        Err(_) => tracing::error!("writing refusal counts took too long; some are not in the log"),
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
