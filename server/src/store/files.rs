//! The keys and whereabouts of encrypted export files, and, when files are
//! kept in the database, their bytes in chunks. A file's key row is written
//! only when its export completes (in the same transaction), and removed
//! with the export, so no key outlives its export.

use super::{Store, Tx};

/// Where a file's encrypted bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// A file in the export directory (shared storage for several instances).
    Dir,
    /// Chunks in the database (reachable from every instance).
    Db,
}

impl Storage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dir => "dir",
            Self::Db => "db",
        }
    }

    pub(crate) fn parse(s: &str) -> Self {
        if s == "db" {
            Self::Db
        } else {
            Self::Dir
        }
    }
}

/// A stored file of an export.
#[derive(Debug, Clone)]
pub struct FileRef {
    pub request_id: String,
    /// `json`, `csv`, `xlsx`, or `frames` (the rows kept for conversions).
    pub kind: String,
    /// The file's name in the export directory (`Dir` storage).
    pub path: String,
    pub wrapped_key: Vec<u8>,
    pub byte_size: u64,
    pub sha256: String,
    pub storage: Storage,
}

impl Store {
    pub(crate) async fn insert_file(&self, tx: &mut Tx<'_>, f: &FileRef) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO export_files (request_id, format, path, wrapped_key, byte_size, sha256, storage) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&f.request_id)
        .bind(&f.kind)
        .bind(&f.path)
        .bind(&f.wrapped_key)
        .bind(f.byte_size as i64)
        .bind(&f.sha256)
        .bind(f.storage.as_str())
        .execute(&mut *tx.tx)
        .await?;
        Ok(())
    }

    /// Forgets every file of export `id`: key rows and stored chunks go in
    /// `tx`; returns the files whose bytes are on disk, to remove.
    pub(crate) async fn take_files(
        &self,
        tx: &mut Tx<'_>,
        id: &str,
    ) -> anyhow::Result<Vec<FileRef>> {
        let rows: Vec<(String, String, i64, String, String)> = sqlx::query_as(
            "SELECT format, path, byte_size, sha256, storage FROM export_files WHERE request_id = $1",
        )
        .bind(id)
        .fetch_all(&mut *tx.tx)
        .await?;
        tx.erases = true;
        sqlx::query("DELETE FROM export_files WHERE request_id = $1")
            .bind(id)
            .execute(&mut *tx.tx)
            .await?;
        sqlx::query("DELETE FROM export_file_chunks WHERE request_id = $1")
            .bind(id)
            .execute(&mut *tx.tx)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, path, size, sha, storage)| FileRef {
                request_id: id.to_string(),
                kind,
                path,
                wrapped_key: Vec::new(),
                byte_size: size as u64,
                sha256: sha,
                storage: Storage::parse(&storage),
            })
            .collect())
    }

    /// The `kind` file of export `id`, with its wrapped key.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn file(&self, id: &str, kind: &str) -> anyhow::Result<Option<FileRef>> {
        let row: Option<(String, Vec<u8>, i64, String, String)> = sqlx::query_as(
            "SELECT path, wrapped_key, byte_size, sha256, storage FROM export_files WHERE request_id = $1 AND format = $2",
        )
        .bind(id)
        .bind(kind)
        .fetch_optional(self.pool())
        .await?;
        Ok(
            row.map(|(path, wrapped_key, size, sha256, storage)| FileRef {
                request_id: id.to_string(),
                kind: kind.to_string(),
                path,
                wrapped_key,
                byte_size: size as u64,
                sha256,
                storage: Storage::parse(&storage),
            }),
        )
    }

    /// Stores chunk `seq` of the file `file` (its unique name) of export
    /// `id`, being written to the database.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn put_chunk(
        &self,
        id: &str,
        file: &str,
        seq: u64,
        data: &[u8],
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO export_file_chunks (request_id, file, seq, data) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(file)
        .bind(seq as i64)
        .bind(data)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Up to `count` chunks of a stored file from `from` on, in order.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn chunks(
        &self,
        id: &str,
        file: &str,
        from: u64,
        count: u64,
    ) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, data FROM export_file_chunks WHERE request_id = $1 AND file = $2 AND seq >= $3 ORDER BY seq LIMIT $4",
        )
        .bind(id)
        .bind(file)
        .bind(from as i64)
        .bind(count as i64)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(s, d)| (s as u64, d)).collect())
    }

    /// Removes the stored chunks of one file (a build attempt that could
    /// not complete), unless a completed file owns them.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn drop_file_chunks(&self, id: &str, file: &str) -> anyhow::Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "DELETE FROM export_file_chunks WHERE request_id = $1 AND file = $2 AND NOT EXISTS \
             (SELECT 1 FROM export_files f WHERE f.request_id = $1 AND f.path = $2)",
        )
        .bind(id)
        .bind(file)
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await
    }

    /// Removes stored chunks no file owns, of every export not being built
    /// (what a crash between writing and completing leaves behind), except
    /// those of exports being built or whose copy is uploading; returns
    /// how many exports had some.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn drop_orphan_chunks(&self) -> anyhow::Result<u64> {
        let mut tx = self.write().await?;
        let r = sqlx::query(
            "DELETE FROM export_file_chunks WHERE NOT EXISTS \
             (SELECT 1 FROM export_files f WHERE f.request_id = export_file_chunks.request_id AND f.path = export_file_chunks.file) \
             AND NOT EXISTS (SELECT 1 FROM export_requests e WHERE e.id = export_file_chunks.request_id \
             AND (e.status = 'processing' OR e.copy_state = 'uploading') AND e.deleted_at IS NULL)",
        )
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    /// Whether the file named `path` of export `id` is owned by a key row.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn owns_file(&self, id: &str, path: &str) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM export_files WHERE request_id = $1 AND path = $2",
        )
        .bind(id)
        .bind(path)
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }

    /// Whether export `id` is being built now, or its encrypted copy being
    /// uploaded (so bytes of it that no file owns yet may still become a file).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn is_building(&self, id: &str) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM export_requests WHERE id = $1 AND deleted_at IS NULL AND (status = 'processing' OR copy_state = 'uploading')",
        )
        .bind(id)
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }
}
