//! The bookkeeping of the browser's end-to-end encrypted copies: which parts
//! arrived, in order, and when the whole copy was checked and kept. Each
//! part's bytes are a file of the export (`copy.NNNNNN`, encrypted at rest
//! like any other), so a delete or the 30-day expiry removes them with the
//! export's other files.

use serde_json::json;

use super::exports::ExportRow;
use super::files::FileRef;
use super::{now, Store};

/// The file kind of the `n`th part of an encrypted copy.
pub fn part_kind(n: u64) -> String {
    format!("copy.{n:06}")
}

/// What became of a part that was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartOutcome {
    /// Stored: the copy now has this many bytes.
    Stored { received: u64 },
    /// Another part took this offset first (or the export changed): the
    /// written bytes are not the copy's.
    Conflict,
}

impl Store {
    /// Marks the copy of `row` as uploading, before its first part's bytes
    /// are written (the sweeper then leaves them alone).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn start_copy(&self, row: &ExportRow) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE export_requests SET copy_state = 'uploading' WHERE id = $1 AND copy_state IS NULL \
             AND status = 'completed' AND delivery = 'client' AND deleted_at IS NULL",
        )
        .bind(&row.id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records `part` (the next one) as the copy's bytes `offset..offset+len`
    /// if the copy still ends at `offset`.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn add_copy_part(
        &self,
        row: &ExportRow,
        offset: u64,
        part: &FileRef,
    ) -> anyhow::Result<PartOutcome> {
        let mut tx = self.write().await?;
        let received = offset + part.byte_size;
        let r = sqlx::query(
            "UPDATE export_requests SET copy_received = $1, copy_parts = copy_parts + 1, last_activity_at = $2 \
             WHERE id = $3 AND copy_state = 'uploading' AND copy_received = $4 AND copy_parts = $5 \
             AND status = 'completed' AND deleted_at IS NULL",
        )
        .bind(received as i64)
        .bind(now())
        .bind(&row.id)
        .bind(offset as i64)
        .bind(row.copy.parts as i64)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(PartOutcome::Conflict);
        }
        self.insert_file(&mut tx, part).await?;
        tx.commit().await?;
        Ok(PartOutcome::Stored { received })
    }

    /// Keeps the copy of `row` (all `size` bytes arrived, with SHA-256
    /// `sha256`) and audits it (`export.copy_kept`). `false`: the copy
    /// changed meanwhile.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn keep_copy(
        &self,
        row: &ExportRow,
        size: u64,
        sha256: &str,
        request_id: Option<&str>,
    ) -> anyhow::Result<bool> {
        let mut tx = self.write().await?;
        let r = sqlx::query(
            "UPDATE export_requests SET copy_state = 'kept', copy_sha256 = $1, last_activity_at = $2 \
             WHERE id = $3 AND copy_state = 'uploading' AND copy_received = $4 AND copy_parts = $5 \
             AND status = 'completed' AND deleted_at IS NULL",
        )
        .bind(sha256)
        .bind(now())
        .bind(&row.id)
        .bind(size as i64)
        .bind(row.copy.parts as i64)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        self.append_audit(
            &mut tx,
            row.event(
                "export.copy_kept",
                json!({ "byte_size": size, "sha256": sha256, "parts": row.copy.parts,
                        "encryption": "aes-256-gcm, key held by the user" }),
            )
            .for_request(request_id),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Drops every part of the copy of `row` if it is still the upload
    /// `row` saw (it failed its check, or its first part was refused): the
    /// upload starts again from 0. Returns the files whose bytes are on
    /// disk, or `None` when the copy changed meanwhile (then nothing goes).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn drop_copy(&self, row: &ExportRow) -> anyhow::Result<Option<Vec<FileRef>>> {
        let mut tx = self.write().await?;
        let r = sqlx::query(
            "UPDATE export_requests SET copy_state = NULL, copy_received = 0, copy_parts = 0, copy_sha256 = NULL \
             WHERE id = $1 AND copy_state = 'uploading' AND copy_parts = $2 AND copy_received = $3",
        )
        .bind(&row.id)
        .bind(row.copy.parts as i64)
        .bind(row.copy.received as i64)
        .execute(&mut *tx.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT format, path, storage FROM export_files WHERE request_id = $1 AND format LIKE 'copy.%'",
        )
        .bind(&row.id)
        .fetch_all(&mut *tx.tx)
        .await?;
        sqlx::query(
            "DELETE FROM export_file_chunks WHERE request_id = $1 AND file IN \
             (SELECT path FROM export_files WHERE request_id = $1 AND format LIKE 'copy.%')",
        )
        .bind(&row.id)
        .execute(&mut *tx.tx)
        .await?;
        tx.erases = true;
        sqlx::query("DELETE FROM export_files WHERE request_id = $1 AND format LIKE 'copy.%'")
            .bind(&row.id)
            .execute(&mut *tx.tx)
            .await?;
        let files = rows
            .into_iter()
            .map(|(kind, path, storage)| FileRef {
                request_id: row.id.clone(),
                kind,
                path,
                wrapped_key: Vec::new(),
                byte_size: 0,
                sha256: String::new(),
                storage: super::files::Storage::parse(&storage),
            })
            .collect();
        tx.commit().await?;
        Ok(Some(files))
    }
}
