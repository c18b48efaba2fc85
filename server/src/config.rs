//! The server's settings from its command line and environment, checked
//! into types, with errors that name the variable to fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use handover::crypto::DataKey;

use crate::auth::JwtConfig;
use crate::store::files::Storage;
use crate::store::Engine;
use crate::{FaultInjection, Settings};

/// Where the master key comes from.
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// `HANDOVER_MASTER_KEY`: 64 hex digits.
    Hex(String),
    /// A file holding the hex key, generated (mode 0600) when missing.
    File(PathBuf),
}

/// Reads (or, from a file that does not exist yet, generates) the master
/// key. `exports_dir` is where export files are kept: a key file there
/// would sit beside what it protects, which earns a warning.
///
/// # Errors
///
/// A key that is not 64 hex digits, or a file that cannot be read or
/// created; each error names the variable or file.
pub fn master_key(source: &MasterKeySource, exports_dir: Option<&Path>) -> anyhow::Result<DataKey> {
    let parse = |hex_key: &str, origin: &str| -> anyhow::Result<DataKey> {
        let bytes = hex::decode(hex_key.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        bytes
            .map(DataKey::from_bytes)
            .with_context(|| format!("{origin} must be 64 hexadecimal digits (32 bytes)"))
    };
    let path = match source {
        MasterKeySource::Hex(k) => return parse(k, "HANDOVER_MASTER_KEY"),
        MasterKeySource::File(p) => p,
    };
    if let Some(dir) = exports_dir {
        let key_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let same_tree = std::fs::canonicalize(&key_dir)
            .ok()
            .zip(std::fs::canonicalize(dir.parent().unwrap_or(dir)).ok())
            .is_some_and(|(k, d)| k.starts_with(&d));
        if same_tree {
            tracing::warn!(
                key = %path.display(),
                "the master key file is stored beside the export files it protects: whoever copies that directory gets both. \
                 Set HANDOVER_MASTER_KEY (from a secret store) or HANDOVER_MASTER_KEY_FILE on another volume"
            );
        }
    }
    match std::fs::read_to_string(path) {
        Ok(k) => return parse(&k, &path.display().to_string()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e)
                .with_context(|| format!("HANDOVER_MASTER_KEY_FILE: reading {}", path.display()))
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("HANDOVER_MASTER_KEY_FILE: creating {}", dir.display()))?;
    }
    let key = DataKey::generate()?;
    // Written whole under another name, then linked into place: a server
    // and an operator command that start at once never read half a key,
    // and the one that loses the race takes the winner's.
    let creating = || format!("HANDOVER_MASTER_KEY_FILE: creating {}", path.display());
    let partial = path.with_extension(format!("partial-{:016x}", rand::random::<u64>()));
    write_private(&partial, hex::encode(key.as_bytes()).as_bytes()).with_context(creating)?;
    let linked = std::fs::hard_link(&partial, path);
    let _ = std::fs::remove_file(&partial);
    match linked {
        Ok(()) => {
            tracing::warn!(path = %path.display(), "no HANDOVER_MASTER_KEY: generated one; keep this file secret and backed up");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let k = std::fs::read_to_string(path).with_context(creating)?;
            parse(&k, &path.display().to_string())
        }
        Err(e) => Err(e).with_context(creating),
    }
}

/// Creates `path` readable by its owner only, in one step (no moment where
/// another user could open it), and writes `bytes`. Fails if it exists.
///
/// # Errors
///
/// I/O errors, or an existing file.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = private_file(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates a new file readable and writable by its owner only (mode 0600
/// from the start on Unix).
///
/// # Errors
///
/// I/O errors, or an existing file.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

/// Where export files' bytes go: `HANDOVER_FILE_STORAGE` (`db` or `dir`),
/// by default the database on PostgreSQL (every instance reaches it) and
/// the data directory on SQLite.
///
/// # Errors
///
/// Another value.
pub fn file_storage(value: Option<&str>, engine: Engine) -> anyhow::Result<Storage> {
    match (value.map(str::trim).filter(|v| !v.is_empty()), engine) {
        (Some("db"), _) => Ok(Storage::Db),
        (Some("dir"), _) => Ok(Storage::Dir),
        (Some(other), _) => anyhow::bail!("HANDOVER_FILE_STORAGE must be db or dir, got {other:?}"),
        (None, Engine::Postgres) => Ok(Storage::Db),
        (None, Engine::Sqlite) => Ok(Storage::Dir),
    }
}

/// The identity provider's settings.
#[derive(Debug, Clone, Default)]
pub struct JwtSettings {
    pub hs256_secret: Option<String>,
    /// A PEM, or a path to one.
    pub rs256_public_key: Option<String>,
    /// The provider's JWKS URL.
    pub jwks_url: Option<String>,
    /// How long JWKS keys are cached (0: the default, 600 s).
    pub jwks_cache_secs: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Longest accepted JWT lifetime, in seconds.
    pub max_lifetime_secs: Option<u64>,
}

impl JwtSettings {
    /// The checked JWT config, if any.
    ///
    /// # Errors
    ///
    /// A short secret, both kinds of key at once, an unreadable or invalid PEM.
    pub fn build(&self) -> anyhow::Result<Option<JwtConfig>> {
        let mut jwt = None;
        if let Some(secret) = &self.hs256_secret {
            anyhow::ensure!(
                secret.len() >= 32,
                "HANDOVER_JWT_HS256_SECRET must be at least 32 bytes"
            );
            jwt = Some(JwtConfig::hs256(
                secret.as_bytes(),
                self.issuer.as_deref(),
                self.audience.as_deref(),
            ));
        }
        if let Some(key) = &self.rs256_public_key {
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
                JwtConfig::rs256(&pem, self.issuer.as_deref(), self.audience.as_deref())
                    .context("HANDOVER_JWT_RS256_PUBLIC_KEY")?,
            );
        }
        if let Some(url) = &self.jwks_url {
            anyhow::ensure!(
                jwt.is_none(),
                "set one of HANDOVER_JWT_HS256_SECRET, HANDOVER_JWT_RS256_PUBLIC_KEY and HANDOVER_JWT_JWKS_URL"
            );
            let ttl = match self.jwks_cache_secs {
                0 => 600,
                s => s,
            };
            let cache = crate::jwks::JwksCache::new(url, std::time::Duration::from_secs(ttl))?;
            jwt = Some(JwtConfig::jwks(
                cache,
                self.issuer.as_deref(),
                self.audience.as_deref(),
            ));
        }
        if let Some(j) = &mut jwt {
            j.max_lifetime_secs = self.max_lifetime_secs;
            if self.issuer.is_none() || self.audience.is_none() {
                tracing::warn!(
                    "JWTs are accepted without an {} check: a token your identity provider issued for another app is accepted here too; set HANDOVER_JWT_ISSUER and HANDOVER_JWT_AUDIENCE",
                    match (self.issuer.is_none(), self.audience.is_none()) {
                        (true, true) => "issuer (iss) or audience (aud)",
                        (true, false) => "issuer (iss)",
                        _ => "audience (aud)",
                    }
                );
            }
        }
        Ok(jwt)
    }
}

/// The test-only fault injection of `HANDOVER_FAULT_PAGES` and
/// `HANDOVER_FAULT_KIND`.
///
/// # Errors
///
/// A rate outside 0–1 or an unknown kind.
pub fn fault_injection(rate: Option<f64>, kind: &str) -> anyhow::Result<Option<FaultInjection>> {
    match rate {
        Some(r) if (0.0..=1.0).contains(&r) => {
            anyhow::ensure!(
                ["mixed", "stall"].contains(&kind),
                "HANDOVER_FAULT_KIND must be mixed or stall"
            );
            tracing::warn!(
                rate = r,
                "HANDOVER_FAULT_PAGES: injecting faults into record pages (tests only)"
            );
            Ok(Some(FaultInjection {
                rolls: Default::default(),
                rate: r,
                stall: kind == "stall",
            }))
        }
        Some(r) => anyhow::bail!("HANDOVER_FAULT_PAGES must be between 0 and 1, got {r}"),
        None => Ok(None),
    }
}

/// Timing settings of the background work, from seconds.
pub fn timing(settings: &mut Settings, stale_after_secs: u64, sweep_secs: u64) {
    settings.stale_after = time::Duration::seconds(stale_after_secs.min(i64::MAX as u64) as i64);
    settings.sweep_every = Duration::from_secs(sweep_secs.max(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_master_keys_are_private_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/master.key");
        let key = master_key(&MasterKeySource::File(path.clone()), None).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Read back, the same key.
        let again = master_key(&MasterKeySource::File(path), None).unwrap();
        assert_eq!(key.as_bytes(), again.as_bytes());
        assert!(master_key(&MasterKeySource::Hex("nope".into()), None)
            .unwrap_err()
            .to_string()
            .contains("HANDOVER_MASTER_KEY"));
    }

    #[test]
    fn file_storage_follows_the_engine_unless_set() {
        assert_eq!(file_storage(None, Engine::Postgres).unwrap(), Storage::Db);
        assert_eq!(file_storage(None, Engine::Sqlite).unwrap(), Storage::Dir);
        assert_eq!(
            file_storage(Some("dir"), Engine::Postgres).unwrap(),
            Storage::Dir
        );
        assert!(file_storage(Some("s3"), Engine::Sqlite)
            .unwrap_err()
            .to_string()
            .contains("HANDOVER_FILE_STORAGE"));
    }
}
