//! `handover-server`: the operator's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use handover::crypto::DataKey;
use handover::format::ExportFormat;
use handover_server::auth::{self, AuthConfig, JwtConfig, Scope, PERM_AUDIT, PERM_EXPORT};
use handover_server::cursor::CursorKey;
use handover_server::datatypes::{Range, Registry};
use handover_server::source::Source;
use handover_server::{
    audit, db, demo, exports, files, jobs, AppState, FaultInjection, Settings, StateInner,
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "handover-server",
    version,
    about = "GDPR \"download my data\": the handover API server and operator tools"
)]
struct Cli {
    /// Database URL.
    #[arg(
        long = "database",
        global = true,
        env = "DATABASE_URL",
        default_value = "sqlite://handover.db"
    )]
    database: String,
    /// Data type config (TOML); the built-in one covers the API reference's five types.
    #[arg(long, global = true, env = "HANDOVER_DATA_TYPES")]
    data_types_config: Option<PathBuf>,
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
        /// Directory for encrypted export files (only its master key is read).
        #[arg(long, env = "HANDOVER_DATA_DIR", default_value = "handover-data")]
        data_dir: PathBuf,
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
    /// Directory for encrypted export files (and the generated master key).
    #[arg(long, env = "HANDOVER_DATA_DIR", default_value = "handover-data")]
    data_dir: PathBuf,
    /// 64 hex digits; wraps every export's data key. Generated into DATA_DIR/master.key when unset.
    #[arg(long, env = "HANDOVER_MASTER_KEY", hide_env_values = true)]
    master_key: Option<String>,
    #[arg(long, env = "HANDOVER_JWT_HS256_SECRET", hide_env_values = true)]
    jwt_hs256_secret: Option<String>,
    /// RS256 public key: a PEM file path or the PEM itself.
    #[arg(long, env = "HANDOVER_JWT_RS256_PUBLIC_KEY")]
    jwt_rs256_public_key: Option<String>,
    #[arg(long, env = "HANDOVER_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    #[arg(long, env = "HANDOVER_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// DEVELOPMENT ONLY: accept requests without a token.
    #[arg(long, env = "HANDOVER_DEV_NO_AUTH", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    dev_no_auth: bool,
    /// Fail client exports idle this many seconds.
    #[arg(long, env = "HANDOVER_STALE_AFTER_SECS", default_value_t = 900)]
    stale_after_secs: u64,
    #[arg(long, env = "HANDOVER_SWEEP_SECS", default_value_t = 30)]
    sweep_secs: u64,
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
}

fn master_key(arg: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<DataKey> {
    let parse = |hex_key: &str, source: &str| -> anyhow::Result<DataKey> {
        let bytes = hex::decode(hex_key.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        bytes
            .map(DataKey::from_bytes)
            .with_context(|| format!("{source} must be 64 hexadecimal digits (32 bytes)"))
    };
    if let Some(k) = arg {
        return parse(k, "HANDOVER_MASTER_KEY");
    }
    let path = data_dir.join("master.key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        return parse(&k, &path.display().to_string());
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating HANDOVER_DATA_DIR {}", data_dir.display()))?;
    let key = DataKey::generate()?;
    std::fs::write(&path, hex::encode(key.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::warn!(path = %path.display(), "no HANDOVER_MASTER_KEY: generated one; keep this file secret and backed up");
    Ok(key)
}

async fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let registry = Registry::load(cli.data_types_config.as_deref())?;
    let pool = db::connect(&cli.database).await?;
    let mut jwt = None;
    if let Some(secret) = &args.jwt_hs256_secret {
        anyhow::ensure!(
            secret.len() >= 32,
            "HANDOVER_JWT_HS256_SECRET must be at least 32 bytes"
        );
        jwt = Some(JwtConfig::hs256(
            secret.as_bytes(),
            args.jwt_issuer.as_deref(),
            args.jwt_audience.as_deref(),
        ));
    }
    if let Some(key) = &args.jwt_rs256_public_key {
        anyhow::ensure!(
            jwt.is_none(),
            "set either HANDOVER_JWT_HS256_SECRET or HANDOVER_JWT_RS256_PUBLIC_KEY, not both"
        );
        let pem = if key.contains("-----BEGIN") {
            key.clone().into_bytes()
        } else {
            std::fs::read(key)
                .with_context(|| format!("HANDOVER_JWT_RS256_PUBLIC_KEY: reading {key}"))?
        };
        jwt = Some(
            JwtConfig::rs256(
                &pem,
                args.jwt_issuer.as_deref(),
                args.jwt_audience.as_deref(),
            )
            .context("HANDOVER_JWT_RS256_PUBLIC_KEY")?,
        );
    }
    if args.dev_no_auth {
        for _ in 0..3 {
            tracing::warn!("HANDOVER_DEV_NO_AUTH is on: requests WITHOUT a token are accepted as any user. NEVER use this in production.");
        }
    }
    let fault = match args.fault_pages {
        Some(r) if (0.0..=1.0).contains(&r) => {
            tracing::warn!(
                rate = r,
                "HANDOVER_FAULT_PAGES: injecting faults into record pages (tests only)"
            );
            anyhow::ensure!(
                ["mixed", "stall"].contains(&args.fault_kind.as_str()),
                "HANDOVER_FAULT_KIND must be mixed or stall"
            );
            Some(FaultInjection {
                rate: r,
                stall: args.fault_kind == "stall",
            })
        }
        Some(r) => anyhow::bail!("HANDOVER_FAULT_PAGES must be between 0 and 1, got {r}"),
        None => None,
    };
    let master = master_key(args.master_key.as_deref(), &args.data_dir)?;
    let cursor_key = CursorKey::derive(&master);
    let files = files::FileStore::new(args.data_dir.join("exports"), master)?;
    let source = Source::open(&cli.database, &registry)?;
    if args.demo && !demo::has_data(&pool, &registry).await {
        let loaded = demo::load(&pool, &registry, args.demo_users, args.demo_records, 42).await?;
        tracing::info!(
            users = loaded.users,
            records = loaded.records,
            "loaded demo data"
        );
    }
    let demo_token = if args.demo {
        let (_, token) = auth::create_token(
            &pool,
            "user_456",
            &["company_123".to_string(), "company_456".to_string()],
            &[PERM_EXPORT.to_string(), PERM_AUDIT.to_string()],
        )
        .await?;
        Some(token)
    } else {
        None
    };
    let state = AppState(Arc::new(StateInner {
        db: pool.clone(),
        registry,
        source,
        cursor_key,
        auth: AuthConfig {
            jwt,
            dev_no_auth: args.dev_no_auth,
        },
        audit: audit::AuditLog::default(),
        metrics: Default::default(),
        files,
        settings: Settings {
            demo_dirs: args
                .demo
                .then(|| (args.www_dir.clone(), args.pkg_dir.clone())),
            demo_token: demo_token.clone(),
            cors_origins: args.cors_origins.clone(),
            max_export_bytes: args.max_export_mb.saturating_mul(1_048_576),
            daily_record_quota: args.daily_record_quota,
            stale_after: time::Duration::seconds(args.stale_after_secs as i64),
            sweep_every: Duration::from_secs(args.sweep_secs.max(1)),
            fault,
        },
        jobs: Default::default(),
    }));
    jobs::spawn(state.clone());
    let listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .with_context(|| format!("HANDOVER_BIND: cannot listen on {}", args.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "handover-server listening");
    if let Some(token) = &demo_token {
        println!(
            "\n  handover demo: http://{addr}/\n  demo token (user_456, company_123): {token}\n"
        );
    }
    axum::serve(
        listener,
        handover_server::app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await?;
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

async fn export_cli(
    cli: &Cli,
    user: &str,
    company: &str,
    format: &str,
    types: &[String],
    out: &std::path::Path,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let registry = Registry::load(cli.data_types_config.as_deref())?;
    let format: ExportFormat = format.parse()?;
    let pool = db::connect(&cli.database).await?;
    let data_types: Vec<String> = if types.is_empty() {
        registry.all().map(|t| t.name.clone()).collect()
    } else {
        for t in types {
            anyhow::ensure!(registry.get(t).is_some(), "unknown data type {t:?}");
        }
        types.to_vec()
    };
    let master = master_key(None, data_dir)?;
    let source = Source::open(&cli.database, &registry)?;
    let state = AppState(Arc::new(StateInner {
        db: pool,
        registry,
        source,
        cursor_key: CursorKey::derive(&master),
        auth: AuthConfig::default(),
        audit: audit::AuditLog::default(),
        metrics: Default::default(),
        files: files::FileStore::new(data_dir.join("exports"), master)?,
        settings: Settings::default(),
        jobs: Default::default(),
    }));
    let scope = Scope {
        user_id: user.to_string(),
        company_id: company.to_string(),
    };
    let range = Range::default();
    let (manifest, estimated_bytes) =
        handover_server::routes::exports::plan(&state, &scope, &data_types, &range, None).await?;
    let operator = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let row = exports::insert(
        &state,
        exports::NewExport {
            user_id: user.to_string(),
            company_id: company.to_string(),
            delivery: "cli".into(),
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
    let file = tokio::fs::File::create(out)
        .await
        .with_context(|| format!("creating {}", out.display()))?;
    let mut sink = jobs::PlainFile {
        file,
        sha: handover::Sha256Stream::default(),
        size: 0,
    };
    // XLSX sheets are assembled beside the output file.
    let tempdir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let built = jobs::build(
        &state,
        &row,
        format,
        &tempdir,
        &mut sink,
        None::<&mut jobs::PlainFile>,
    )
    .await;
    let records = match built {
        Ok(b) => b.records,
        Err(e) => {
            exports::fail(&state, &row, "generation failed", None).await?;
            return Err(e);
        }
    };
    tokio::io::AsyncWriteExt::flush(&mut sink.file).await?;
    let (sha, size) = (sink.sha.finish_hex(), sink.size);
    let mut details = serde_json::Map::new();
    details.insert("operator".into(), json!(operator));
    details.insert("file".into(), json!(out.display().to_string()));
    let done = exports::Completion {
        records,
        byte_size: size,
        sha256: sha.clone(),
        details,
    };
    exports::mark_completed(&state, &row, &done, None).await?;
    eprintln!(
        "{}: {records} records, {size} bytes, sha256 {sha} (request {})",
        out.display(),
        row.id
    );
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve(args) => serve(&cli, args).await?,
        Command::DemoData {
            users,
            records,
            seed,
        } => {
            let registry = Registry::load(cli.data_types_config.as_deref())?;
            let pool = db::connect(&cli.database).await?;
            let started = std::time::Instant::now();
            let loaded = demo::load(&pool, &registry, *users, *records, *seed).await?;
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
            let pool = db::connect(&cli.database).await?;
            let perms = if permissions.is_empty() {
                vec![PERM_EXPORT.to_string()]
            } else {
                permissions.clone()
            };
            let (id, token) = auth::create_token(&pool, user, companies, &perms).await?;
            eprintln!(
                "token id {id} for {user} in {} with {}",
                companies.join(", "),
                perms.join(", ")
            );
            println!("{token}");
        }
        Command::Token(TokenCommand::Revoke { token_id }) => {
            let pool = db::connect(&cli.database).await?;
            if !auth::revoke_token(&pool, token_id).await? {
                eprintln!("no active token {token_id}");
                return Ok(ExitCode::from(1));
            }
            eprintln!("revoked {token_id}");
        }
        Command::Audit(AuditCommand::Verify) => {
            let pool = db::connect(&cli.database).await?;
            match audit::verify(&pool).await? {
                audit::Verification::Intact { rows } => println!("audit log intact: {rows} rows"),
                audit::Verification::Broken { seq, reason } => {
                    println!("audit log BROKEN at row {seq}: {reason}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Export {
            user,
            company,
            format,
            data_types,
            out,
            data_dir,
        } => {
            export_cli(&cli, user, company, format, data_types, out, data_dir).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
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
