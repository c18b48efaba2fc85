//! `handover-server`'s command line: serve, demo data, tokens, the audit
//! log, and the privacy officer's export.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use handover::format::ExportFormat;
use serde_json::json;

use crate::auth::{self, Scope, PERM_EXPORT};
use crate::config::{self, JwtSettings, MasterKeySource};
use crate::datatypes::{Range, Registry};
use crate::startup::{self, DemoOptions, StateOptions};
use crate::store::audit::Verification;
use crate::store::exports::{Completion, Delivery, NewExport};
use crate::store::Store;
use crate::{demo, jobs, plan, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "handover-server",
    version,
    about = "GDPR \"download my data\": the handover API server and operator tools"
)]
pub struct Cli {
    /// Database URL: sqlite://FILE (embedded, one instance) or
    /// postgres://USER:PASSWORD@HOST/DB (any number of instances).
    #[arg(
        long = "database",
        global = true,
        env = "DATABASE_URL",
        default_value = "sqlite://handover.db"
    )]
    database: String,
    /// Data type config (TOML); the built-in one covers the API reference's
    /// five types (in SQLite's or PostgreSQL's dialect, by DATABASE_URL).
    #[arg(long, global = true, env = "HANDOVER_DATA_TYPES")]
    data_types_config: Option<PathBuf>,
    /// Append-only file that receives each new head of the audit chain
    /// (`serve` default: DATA_DIR/audit.head); `audit verify` checks it.
    #[arg(long, global = true, env = "HANDOVER_AUDIT_HEAD_FILE")]
    audit_head_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve(Box<ServeArgs>),
    /// Load deterministic demo data.
    DemoData {
        /// Generated users (besides user_456).
        #[arg(long, default_value_t = 3)]
        users: u64,
        /// About this many records per user.
        #[arg(long, default_value_t = 100)]
        records: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Completion notifications (signed webhooks) per company.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Decrypt a browser export's encrypted copy (downloaded from
    /// `GET /api/data/export/{id}/download`) with the key from its link.
    Decrypt {
        /// The key (43 characters of base64url, which may start with `-`),
        /// or the whole link.
        #[arg(
            long,
            env = "HANDOVER_COPY_KEY",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        key: String,
        /// Where the plaintext goes (created 0600; must not exist yet).
        #[arg(long)]
        out: PathBuf,
        /// The encrypted copy (`….hov`).
        input: PathBuf,
    },
    /// A privacy officer's export of one user (same writers, audited).
    Export {
        #[arg(long)]
        user: String,
        #[arg(long)]
        company: String,
        #[arg(long)]
        format: String,
        /// Comma-separated; default: every configured type.
        #[arg(long, value_delimiter = ',')]
        data_types: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// Directory of the server's data (the default master key file is read from it).
        #[arg(long, env = "HANDOVER_DATA_DIR", default_value = "handover-data")]
        data_dir: PathBuf,
        /// 64 hex digits, as for `serve` (signs nothing here, but an export
        /// must not generate a new key beside the server's).
        #[arg(long, env = "HANDOVER_MASTER_KEY", hide_env_values = true)]
        master_key: Option<String>,
        #[arg(long, env = "HANDOVER_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print one new API token on stdout.
    Create {
        #[arg(long)]
        user: String,
        /// Repeat for several companies.
        #[arg(long = "company", required = true)]
        companies: Vec<String>,
        /// Repeat for several; default data:export.
        #[arg(long = "permission")]
        permissions: Vec<String>,
    },
    /// Revoke a token by id (or by the token itself).
    Revoke { token_id: String },
}

#[derive(Debug, Subcommand)]
enum WebhookCommand {
    /// Send export.completed, export.failed and export.expired of a company
    /// to URL; prints the signing secret (whsec_…) on stdout.
    Set {
        #[arg(long)]
        company: String,
        #[arg(long)]
        url: String,
        /// Keep this secret instead of generating one.
        #[arg(
            long,
            env = "HANDOVER_WEBHOOK_SECRET",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        secret: Option<String>,
    },
    /// Stop sending a company's notifications.
    Remove {
        #[arg(long)]
        company: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Exit 0 when the chain is intact; otherwise print the first bad row and exit 1.
    Verify,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[arg(long, env = "HANDOVER_BIND", default_value = "127.0.0.1:8080")]
    bind: String,
    /// Load demo data into an empty database; serve www/ at / and pkg/ at /pkg/.
    #[arg(long, env = "HANDOVER_DEMO", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    demo: bool,
    #[arg(long, env = "HANDOVER_WWW_DIR", default_value = "www")]
    www_dir: PathBuf,
    #[arg(long, env = "HANDOVER_PKG_DIR", default_value = "pkg")]
    pkg_dir: PathBuf,
    /// Directory for encrypted export files (directory storage), build
    /// scratch space and, by default, the generated master key.
    #[arg(long, env = "HANDOVER_DATA_DIR", default_value = "handover-data")]
    data_dir: PathBuf,
    /// 64 hex digits; wraps every export's data key and signs cursors.
    #[arg(long, env = "HANDOVER_MASTER_KEY", hide_env_values = true)]
    master_key: Option<String>,
    /// Without HANDOVER_MASTER_KEY: the file holding it (generated, mode
    /// 0600, when missing). Default DATA_DIR/master.key.
    #[arg(long, env = "HANDOVER_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// Where export files' bytes go: `db` (the database; the default on
    /// PostgreSQL, reachable from every instance) or `dir` (DATA_DIR/exports;
    /// the default on SQLite; share it between instances).
    #[arg(long, env = "HANDOVER_FILE_STORAGE")]
    file_storage: Option<String>,
    #[arg(
        long,
        env = "HANDOVER_JWT_HS256_SECRET",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    jwt_hs256_secret: Option<String>,
    /// RS256 public key: a PEM file path or the PEM itself (which starts
    /// with `-----BEGIN`).
    #[arg(
        long,
        env = "HANDOVER_JWT_RS256_PUBLIC_KEY",
        allow_hyphen_values = true
    )]
    jwt_rs256_public_key: Option<String>,
    /// The identity provider's JWKS URL (e.g. https://TENANT.auth0.com/.well-known/jwks.json):
    /// its public keys, by key id, cached and fetched again on rotation.
    #[arg(long, env = "HANDOVER_JWT_JWKS_URL")]
    jwt_jwks_url: Option<String>,
    /// How long fetched JWKS keys are used before they are fetched again.
    #[arg(long, env = "HANDOVER_JWT_JWKS_CACHE_SECS", default_value_t = 600)]
    jwt_jwks_cache_secs: u64,
    #[arg(long, env = "HANDOVER_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    #[arg(long, env = "HANDOVER_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Refuse JWTs meant to live longer than this (exp − iat, and exp from
    /// now), in seconds; they must then carry `iat`.
    #[arg(long, env = "HANDOVER_JWT_MAX_LIFETIME_SECS")]
    jwt_max_lifetime_secs: Option<u64>,
    /// DEVELOPMENT ONLY: accept requests without a token.
    #[arg(long, env = "HANDOVER_DEV_NO_AUTH", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    dev_no_auth: bool,
    /// Fail client exports idle this many seconds, and requeue server
    /// builds that gave no sign of life for as long (their instance stopped).
    #[arg(long, env = "HANDOVER_STALE_AFTER_SECS", default_value_t = 900)]
    stale_after_secs: u64,
    #[arg(long, env = "HANDOVER_SWEEP_SECS", default_value_t = 30)]
    sweep_secs: u64,
    /// The first wait before a failed webhook delivery is retried, in
    /// milliseconds; doubled after each failure (8 attempts in all).
    #[arg(long, env = "HANDOVER_WEBHOOK_BACKOFF_MS", default_value_t = 5000)]
    webhook_backoff_ms: u64,
    /// Failed authentications per client IP and minute before that IP's
    /// requests are answered 429 before authentication (0: never).
    #[arg(long, env = "HANDOVER_UNAUTH_PER_MINUTE", default_value_t = crate::guard::DEFAULT_UNAUTH_PER_MINUTE)]
    unauth_per_minute: u64,
    /// Milliseconds a 429 to such an address is held back (0: none), so a
    /// flooder that waits for its answers slows down.
    #[arg(long, env = "HANDOVER_TARPIT_MS", default_value_t = 1000)]
    tarpit_ms: u64,
    /// Seconds a client has to send a request's headers.
    #[arg(long, env = "HANDOVER_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    header_timeout_secs: u64,
    /// Seconds a client has to send a request's body, once it is read.
    #[arg(long, env = "HANDOVER_BODY_TIMEOUT_SECS", default_value_t = 30)]
    body_timeout_secs: u64,
    /// Connections open at once; more wait to be accepted.
    #[arg(long, env = "HANDOVER_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// TESTS ONLY: share (0–1) of record page requests that fail with a 500 or a dropped connection.
    #[arg(long, env = "HANDOVER_FAULT_PAGES", hide = true)]
    fault_pages: Option<f64>,
    /// TESTS ONLY: `stall` makes the injected faults hang instead of failing.
    #[arg(
        long,
        env = "HANDOVER_FAULT_KIND",
        hide = true,
        default_value = "mixed"
    )]
    fault_kind: String,
    /// Origins allowed to call the API from browsers, comma-separated (`*` for any).
    #[arg(long, env = "HANDOVER_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Largest export accepted, in MB (estimated); larger ones get FILE_TOO_LARGE.
    #[arg(long, env = "HANDOVER_MAX_EXPORT_MB", default_value_t = 2048)]
    max_export_mb: u64,
    /// Records one user may export per company in 24 hours (QUOTA_EXCEEDED beyond).
    #[arg(
        long,
        env = "HANDOVER_DAILY_RECORD_QUOTA",
        default_value_t = 50_000_000
    )]
    daily_record_quota: u64,
    /// Demo mode: users generated, and records per user.
    #[arg(long, env = "HANDOVER_DEMO_USERS", default_value_t = 3)]
    demo_users: u64,
    #[arg(long, env = "HANDOVER_DEMO_RECORDS", default_value_t = 150)]
    demo_records: u64,
    /// TESTS ONLY: server builds never finish (they keep their claim alive),
    /// so a test can stop the instance in the middle of one.
    #[arg(long, env = "HANDOVER_TEST_HOLD_BUILDS", hide = true, action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    test_hold_builds: bool,
}

/// `HANDOVER_DATA_DIR` for the operator commands that have no flag for it
/// (as `serve` defaults it).
fn operator_data_dir() -> PathBuf {
    std::env::var_os("HANDOVER_DATA_DIR")
        .map_or_else(|| PathBuf::from("handover-data"), PathBuf::from)
}

/// The store for an operator command: the audit chain keyed when the
/// master key is at hand (HANDOVER_MASTER_KEY, HANDOVER_MASTER_KEY_FILE, or
/// DATA_DIR/master.key). Commands that write to the log are refused
/// without it, except on a fresh install (no key recorded in the database
/// and an empty audit log): there they create DATA_DIR/master.key, the key
/// `serve` would create on its first start, so that `token create` can
/// come before the server's first run. A key other than the one the
/// database was set up with is refused: rows under it would break the
/// chain.
async fn operator_store(cli: &Cli, writes: bool) -> anyhow::Result<Store> {
    let mut store = Store::connect(&cli.database).await?;
    let data_dir = operator_data_dir();
    let key_file = std::env::var_os("HANDOVER_MASTER_KEY_FILE")
        .map_or_else(|| data_dir.join("master.key"), PathBuf::from);
    let source = match std::env::var("HANDOVER_MASTER_KEY")
        .ok()
        .filter(|k| !k.is_empty())
    {
        Some(k) => Some(MasterKeySource::Hex(k)),
        // A key file is made only where `serve` would make it, on a fresh
        // install: elsewhere a new key is not the database's, and would be
        // left lying there when refused.
        None => (key_file.exists() || (writes && is_fresh(&store).await?))
            .then(|| MasterKeySource::File(key_file.clone())),
    };
    match source {
        Some(src) => {
            let key = config::master_key(&src, None)?;
            store.check_master_key(&key, writes).await?;
            store = store.with_master_key(&key);
        }
        // An unkeyed row would break the keyed chain the server writes.
        None => anyhow::ensure!(
            !writes,
            "the audit log is keyed with the master key, and there is none at {}: set HANDOVER_MASTER_KEY (or HANDOVER_MASTER_KEY_FILE, or HANDOVER_DATA_DIR to the server's) so this change is logged in the chain",
            key_file.display()
        ),
    }
    if writes {
        if let Some(f) = written_head_file(cli, &data_dir, &store).await {
            store = store.with_existing_head_file(f);
        }
    }
    Ok(store)
}

/// A fresh install: no master key recorded, and an empty audit log.
async fn is_fresh(store: &Store) -> anyhow::Result<bool> {
    Ok(store.recorded_master_key().await?.is_none() && store.audit_is_empty().await?)
}

/// Where an operator command appends the heads of the rows it writes: the
/// file `serve` keeps, so that the removal of an operator's newest rows
/// shows in `audit verify` as a server's would. That is
/// `HANDOVER_AUDIT_HEAD_FILE`, else `DATA_DIR/audit.head`, when it exists
/// and is empty or its newest head is a row of this database. The file is never
/// created here: `serve` creates it, as its own user, and one made by an
/// operator (as root, say) could lock the server out of it. Otherwise a
/// warning says that the command's rows are covered once the server
/// appends its next head (also when the file cannot be read, or the
/// database cannot be asked).
async fn written_head_file(cli: &Cli, data_dir: &Path, store: &Store) -> Option<PathBuf> {
    use crate::store::audit::HeadFileState;
    let file = head_file_path(cli, data_dir);
    let refused = match store.head_file_state(&file).await {
        Ok(HeadFileState::Empty | HeadFileState::Ours) => return Some(file),
        Ok(HeadFileState::Missing) => {
            "there is no such file yet (the server creates it)".to_string()
        }
        Ok(HeadFileState::NoWholeHead) => "it holds no whole head".to_string(),
        Ok(HeadFileState::Foreign { seq }) => format!(
            "its newest head, row {seq}, is not a row of this database as recorded \
             (another database's file, or the log was altered: `audit verify` tells which)"
        ),
        Err(e) => format!("{e:#}"),
    };
    eprintln!(
        "warning: this command's audit head is not appended to {}: {refused}; \
         its rows are covered once the server appends its next head \
         (set HANDOVER_AUDIT_HEAD_FILE or HANDOVER_DATA_DIR to the server's)",
        file.display()
    );
    None
}

/// The head file `serve` keeps: `HANDOVER_AUDIT_HEAD_FILE`, else
/// `DATA_DIR/audit.head`.
fn head_file_path(cli: &Cli, data_dir: &Path) -> PathBuf {
    cli.audit_head_file
        .clone()
        .unwrap_or_else(|| data_dir.join("audit.head"))
}

fn master_source(hex: Option<&str>, file: Option<&Path>, data_dir: &Path) -> MasterKeySource {
    match (hex, file) {
        (Some(k), _) => MasterKeySource::Hex(k.to_string()),
        (None, Some(f)) => MasterKeySource::File(f.to_path_buf()),
        (None, None) => MasterKeySource::File(data_dir.join("master.key")),
    }
}

async fn serve(cli: &Cli, a: &ServeArgs) -> anyhow::Result<()> {
    let mut settings = Settings {
        demo_dirs: a.demo.then(|| (a.www_dir.clone(), a.pkg_dir.clone())),
        cors_origins: a.cors_origins.clone(),
        max_export_bytes: a.max_export_mb.saturating_mul(1_048_576),
        daily_record_quota: a.daily_record_quota,
        fault: config::fault_injection(a.fault_pages, &a.fault_kind)?,
        hold_builds: a.test_hold_builds,
        ..Settings::default()
    };
    config::timing(&mut settings, a.stale_after_secs, a.sweep_secs);
    settings.webhook_backoff = std::time::Duration::from_millis(a.webhook_backoff_ms.max(1));
    settings.unauth_per_minute = a.unauth_per_minute;
    settings.tarpit = std::time::Duration::from_millis(a.tarpit_ms);
    settings.header_timeout = std::time::Duration::from_secs(a.header_timeout_secs.max(1));
    settings.body_timeout = std::time::Duration::from_secs(a.body_timeout_secs.max(1));
    settings.max_connections = a.max_connections.max(1);
    let options = StateOptions {
        database_url: cli.database.clone(),
        data_types: cli.data_types_config.clone(),
        data_dir: a.data_dir.clone(),
        master_key: master_source(
            a.master_key.as_deref(),
            a.master_key_file.as_deref(),
            &a.data_dir,
        ),
        file_storage: a.file_storage.clone(),
        audit_head_file: Some(head_file_path(cli, &a.data_dir)),
        audit_head_file_exists: false,
        jwt: JwtSettings {
            hs256_secret: a.jwt_hs256_secret.clone(),
            rs256_public_key: a.jwt_rs256_public_key.clone(),
            jwks_url: a.jwt_jwks_url.clone(),
            jwks_cache_secs: a.jwt_jwks_cache_secs,
            issuer: a.jwt_issuer.clone(),
            audience: a.jwt_audience.clone(),
            max_lifetime_secs: a.jwt_max_lifetime_secs,
        },
        dev_no_auth: a.dev_no_auth,
        settings,
    };
    let demo = a.demo.then_some(DemoOptions {
        users: a.demo_users,
        records: a.demo_records,
    });
    startup::serve(options, &a.bind, demo).await
}

/// Who runs the CLI, for the audit log.
fn operator() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}

struct ExportArgs<'a> {
    user: &'a str,
    company: &'a str,
    format: &'a str,
    types: &'a [String],
    out: &'a Path,
    data_dir: &'a Path,
    master: MasterKeySource,
}

async fn export_cli(cli: &Cli, a: ExportArgs<'_>) -> anyhow::Result<()> {
    let format: ExportFormat = a.format.parse()?;
    let probe = Store::connect(&cli.database).await?;
    // As for the other operator commands: a master key is generated only on
    // a fresh install. Anywhere else a new key would not be the server's,
    // and would be left lying beside its data when refused.
    if let MasterKeySource::File(f) = &a.master {
        anyhow::ensure!(
            f.exists() || is_fresh(&probe).await?,
            "no master key at {}: set HANDOVER_MASTER_KEY (or HANDOVER_MASTER_KEY_FILE, or --data-dir to the server's) to export from this database",
            f.display()
        );
    }
    let head_file = written_head_file(cli, a.data_dir, &probe).await;
    probe.close().await;
    let state = startup::open_state(StateOptions {
        database_url: cli.database.clone(),
        data_types: cli.data_types_config.clone(),
        data_dir: a.data_dir.to_path_buf(),
        master_key: a.master,
        file_storage: None,
        jwt: JwtSettings::default(),
        dev_no_auth: false,
        settings: Settings::default(),
        audit_head_file: head_file,
        audit_head_file_exists: true,
    })
    .await?;
    let data_types: Vec<String> = if a.types.is_empty() {
        state.registry.all().map(|t| t.name.clone()).collect()
    } else {
        for t in a.types {
            anyhow::ensure!(state.registry.get(t).is_some(), "unknown data type {t:?}");
        }
        a.types.to_vec()
    };
    let scope = Scope {
        user_id: a.user.to_string(),
        company_id: a.company.to_string(),
    };
    let range = Range::default();
    let (manifest, estimated_bytes) = plan::plan(&state, &scope, &data_types, &range, None).await?;
    let operator = operator();
    // The output holds personal data: readable by its owner only, from the start.
    let file = config::private_file(a.out)
        .with_context(|| format!("creating {} (it must not exist yet)", a.out.display()))?;
    // Nothing half-written is left behind, whatever step fails.
    let mut partial = RemoveUnlessKept(Some(a.out));
    let row = state
        .store
        .create_export(
            NewExport {
                user_id: a.user.to_string(),
                company_id: a.company.to_string(),
                delivery: Delivery::Cli,
                export_format: format.as_str().into(),
                data_types,
                range,
                metadata: json!({ "purpose": "dpo_request", "operator": operator }),
                manifest,
                estimated_bytes,
            },
            None,
        )
        .await?;
    let mut sink = jobs::PlainFile {
        file: tokio::fs::File::from_std(file),
        sha: handover::Sha256Stream::default(),
        size: 0,
    };
    // XLSX sheets are assembled beside the output file.
    let tempdir = match a.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Through `processing`, with its `export.started`, as every other
    // build; completed only when the file is whole and synced.
    let finished = async {
        state.store.mark_started(&row, None).await?;
        let b = jobs::build(
            &state,
            &row,
            format,
            &tempdir,
            &mut sink,
            None::<&mut jobs::PlainFile>,
        )
        .await?;
        tokio::io::AsyncWriteExt::flush(&mut sink.file).await?;
        sink.file.sync_all().await?;
        let (sha, size) = (sink.sha.finish_hex(), sink.size);
        let mut details = serde_json::Map::new();
        details.insert("operator".into(), json!(operator));
        details.insert("file".into(), json!(a.out.display().to_string()));
        let done = Completion {
            records: b.records,
            byte_size: size,
            sha256: sha.clone(),
            details,
            failed_types: Vec::new(),
        };
        let completed = state.store.complete_export(&row, &done, &[], None).await?;
        // Deleted meanwhile (or failed by another hand): no file is handed
        // over that the log does not show as completed.
        anyhow::ensure!(
            completed,
            "request {} was deleted or closed while it was built; the file is removed",
            row.id
        );
        anyhow::Ok((b.records, size, sha))
    }
    .await;
    let (records, size, sha) = match finished {
        Ok(f) => f,
        Err(e) => {
            // Nothing half-written is left behind, and the request is not
            // left `processing`: CLI builds are never picked up again.
            drop(partial);
            if let Err(f) = state
                .store
                .fail_export(&row, "generation failed", None)
                .await
            {
                eprintln!("warning: recording the failure failed: {f:#}");
            }
            return Err(e);
        }
    };
    partial.0 = None;
    eprintln!(
        "{}: {records} records, {size} bytes, sha256 {sha} (request {})",
        a.out.display(),
        row.id
    );
    Ok(())
}

/// Runs a parsed command line.
///
/// # Errors
///
/// Whatever stops the command; the caller prints it.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve(args) => serve(&cli, args).await?,
        Command::DemoData {
            users,
            records,
            seed,
        } => {
            let store = Store::connect(&cli.database).await?;
            let registry = Registry::load_for(cli.data_types_config.as_deref(), store.engine())?;
            let started = std::time::Instant::now();
            let loaded =
                demo::load(&store, &cli.database, &registry, *users, *records, *seed).await?;
            eprintln!(
                "loaded {} users, {} records in {:.1?}",
                loaded.users,
                loaded.records,
                started.elapsed()
            );
        }
        Command::Token(TokenCommand::Create {
            user,
            companies,
            permissions,
        }) => {
            let store = operator_store(&cli, true).await?;
            let perms = if permissions.is_empty() {
                vec![PERM_EXPORT.to_string()]
            } else {
                permissions.clone()
            };
            let (id, token) =
                auth::create_token(&store, user, companies, &perms, &operator()).await?;
            eprintln!(
                "token id {id} for {user} in {} with {}",
                companies.join(", "),
                perms.join(", ")
            );
            println!("{token}");
        }
        Command::Token(TokenCommand::Revoke { token_id }) => {
            let store = operator_store(&cli, true).await?;
            if !auth::revoke_token(&store, token_id, &operator()).await? {
                eprintln!("no active token {token_id}");
                return Ok(ExitCode::from(1));
            }
            eprintln!("revoked {token_id}");
        }
        Command::Webhook(WebhookCommand::Set {
            company,
            url,
            secret,
        }) => {
            crate::webhooks::check_url(url)?;
            let secret = match secret {
                Some(s) => {
                    crate::webhooks::sign(s, "msg_check", 0, "")?;
                    s.clone()
                }
                None => crate::webhooks::new_secret(),
            };
            let store = operator_store(&cli, true).await?;
            store
                .set_webhook(
                    &crate::store::webhooks::Endpoint {
                        company_id: company.clone(),
                        url: url.clone(),
                        secret: secret.clone(),
                    },
                    &operator(),
                )
                .await?;
            eprintln!(
                "{company}'s export notifications go to {url}; verify them with this secret:"
            );
            println!("{secret}");
        }
        Command::Webhook(WebhookCommand::Remove { company }) => {
            let store = operator_store(&cli, true).await?;
            if !store.remove_webhook(company, &operator()).await? {
                eprintln!("{company} has no webhook");
                return Ok(ExitCode::from(1));
            }
            eprintln!("removed {company}'s webhook");
        }
        Command::Audit(AuditCommand::Verify) => {
            let store = operator_store(&cli, false).await?;
            // The head file `serve` keeps by default, when none is named:
            // without it, removing the newest rows would go unseen.
            let head_file = Some(head_file_path(&cli, &operator_data_dir()))
                .filter(|f| cli.audit_head_file.is_some() || f.exists());
            let heads = match &head_file {
                Some(f) => crate::store::audit::read_heads(f)?,
                None => Default::default(),
            };
            if heads.torn > 0 {
                eprintln!(
                    "warning: {} line(s) of the head file are not whole heads (writes cut short by a crash or a full disk): skipped",
                    heads.torn
                );
            }
            if head_file.is_none() {
                // The chain alone cannot show that its newest rows were
                // removed: say so rather than let "intact" imply it.
                eprintln!(
                    "warning: no audit head in {} (set HANDOVER_AUDIT_HEAD_FILE or HANDOVER_DATA_DIR to serve's): \
                     the chain is checked, but removal of its newest rows cannot be detected",
                    operator_data_dir().join("audit.head").display()
                );
            }
            // A head file that is there but holds no head, beside a log
            // that has rows, was emptied: serve writes a head with every
            // row it appends.
            let emptied = head_file.as_deref().filter(|_| heads.heads.is_empty());
            match (store.verify_audit_heads(heads.heads).await?, emptied) {
                (Verification::Intact { rows }, Some(file)) if rows > 0 => {
                    println!(
                        "audit log BROKEN: the head file {} holds no head, but the log has {rows} rows; \
                         serve writes a head with every row, so removal of the newest rows cannot be ruled out",
                        file.display()
                    );
                    return Ok(ExitCode::from(1));
                }
                (Verification::Intact { rows }, _) => println!("audit log intact: {rows} rows"),
                (Verification::Broken { seq, reason }, _) => {
                    println!("audit log BROKEN at row {seq}: {reason}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Decrypt { key, out, input } => {
            if let Err(e) = decrypt_copy(key, input, out) {
                eprintln!("error: {e:#}");
                return Ok(ExitCode::from(1));
            }
        }
        Command::Export {
            user,
            company,
            format,
            data_types,
            out,
            data_dir,
            master_key,
            master_key_file,
        } => {
            let master = master_source(master_key.as_deref(), master_key_file.as_deref(), data_dir);
            export_cli(
                &cli,
                ExportArgs {
                    user,
                    company,
                    format,
                    types: data_types,
                    out,
                    data_dir,
                    master,
                },
            )
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Decrypts an encrypted copy to `out` as it reads; on any failure the
/// partial plaintext is removed (nothing unauthenticated is left behind).
fn decrypt_copy(key: &str, input: &Path, out: &Path) -> anyhow::Result<()> {
    use handover::crypto::{DataKey, Decryptor, HEADER_SIZE};
    use std::io::{Read as _, Write as _};
    let key = DataKey::from_link(key).context("--key")?;
    let mut src =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut header = [0u8; HEADER_SIZE];
    src.read_exact(&mut header)
        .map_err(|_| anyhow::anyhow!("{} is not an encrypted copy (too short)", input.display()))?;
    let mut dec = Decryptor::new(&key, &header)
        .with_context(|| format!("{} is not an encrypted copy", input.display()))?;
    let file = config::private_file(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    let mut partial = RemoveUnlessKept(Some(out));
    let mut dst = std::io::BufWriter::new(file);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dst.write_all(&dec.push(&buf[..n]).map_err(wrong_key)?)?;
    }
    dst.write_all(&dec.finish().map_err(wrong_key)?)?;
    dst.flush()?;
    dst.get_ref().sync_all()?;
    partial.0 = None;
    eprintln!("decrypted {} to {}", input.display(), out.display());
    Ok(())
}

/// Says what a decryption failure most likely means.
fn wrong_key(e: handover::crypto::CryptoError) -> anyhow::Error {
    use handover::crypto::CryptoError;
    match e {
        CryptoError::Chunk(0) => anyhow::anyhow!(
            "the copy could not be decrypted: wrong key (or the file's start was altered)"
        ),
        other => anyhow::anyhow!("the copy could not be decrypted: {other}"),
    }
}

/// The binary's `main`: logging to stderr (`HANDOVER_LOG`), then the command.
pub async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANDOVER_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Removes a file being written when dropped, unless its path was taken
/// out (the file is complete).
struct RemoveUnlessKept<'a>(Option<&'a Path>);

impl Drop for RemoveUnlessKept<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn values_that_start_with_a_hyphen_are_values() {
        let pem = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----";
        let cli = Cli::try_parse_from([
            "handover-server",
            "serve",
            "--jwt-rs256-public-key",
            pem,
            "--jwt-hs256-secret",
            "-secret",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert_eq!(args.jwt_rs256_public_key.as_deref(), Some(pem));
        assert_eq!(args.jwt_hs256_secret.as_deref(), Some("-secret"));
    }
}
