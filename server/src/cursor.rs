//! Record-page cursors: where the next page of a data type starts, and how
//! many records came before it. Cursors are signed (HMAC-SHA256 under a key
//! derived from the master key, bound to the export and the data type) and
//! canonical, so a client can neither forge progress nor page past the end,
//! and any instance sharing the master key accepts them.
//!
//! Layout: `base64url(JSON [sort_key, offset])` `.` `base64url(MAC[..12])`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::source::SortKey;

type HmacSha256 = Hmac<Sha256>;

/// MAC bytes kept in a cursor.
const MAC_LEN: usize = 12;

/// A decoded cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The sort key of the last record before the cursor.
    pub after: SortKey,
    /// How many records of the data type come before the cursor.
    pub offset: u64,
}

/// The cursor is not one this server made for this export and data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the cursor is not valid for this export and data type")]
pub struct BadCursor;

/// The signing key of cursors.
#[derive(Clone)]
pub struct CursorKey([u8; 32]);

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(…)")
    }
}

impl CursorKey {
    /// The cursor key derived from the master key (so every instance that
    /// shares `HANDOVER_MASTER_KEY` accepts the same cursors).
    pub fn derive(master: &handover::crypto::DataKey) -> Self {
        let mut mac =
            HmacSha256::new_from_slice(master.as_bytes()).expect("HMAC takes any key size");
        mac.update(b"handover record cursor v1");
        Self(mac.finalize().into_bytes().into())
    }

    fn mac(&self, export_id: &str, data_type: &str, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key size");
        for part in [export_id, data_type, payload] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The cursor text for `cursor` in `data_type` of `export_id`.
    pub fn encode(&self, export_id: &str, data_type: &str, cursor: &Cursor) -> String {
        let payload = URL_SAFE_NO_PAD.encode(payload_json(cursor));
        let tag = self
            .mac(export_id, data_type, &payload)
            .finalize()
            .into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(&tag[..MAC_LEN]))
    }

    /// Reads a cursor made by [`encode`](Self::encode) for the same export
    /// and data type.
    ///
    /// # Errors
    ///
    /// [`BadCursor`] for anything else: another export's cursor, a forged or
    /// altered one, or one not in canonical form (padding, whitespace).
    pub fn decode(
        &self,
        export_id: &str,
        data_type: &str,
        text: &str,
    ) -> Result<Cursor, BadCursor> {
        let (payload, tag) = text.split_once('.').ok_or(BadCursor)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| BadCursor)?;
        if tag.len() != MAC_LEN {
            return Err(BadCursor);
        }
        self.mac(export_id, data_type, payload)
            .verify_truncated_left(&tag)
            .map_err(|_| BadCursor)?;
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| BadCursor)?;
        let (after, offset): (SortKey, u64) =
            serde_json::from_slice(&json).map_err(|_| BadCursor)?;
        let cursor = Cursor { after, offset };
        // Only the exact text this server would make.
        if URL_SAFE_NO_PAD.encode(payload_json(&cursor)) != payload
            || URL_SAFE_NO_PAD.encode(&tag) != text[payload.len() + 1..]
        {
            return Err(BadCursor);
        }
        Ok(cursor)
    }
}

fn payload_json(c: &Cursor) -> Vec<u8> {
    // Serialising a key and a number cannot fail.
    serde_json::to_vec(&(&c.after, c.offset)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let key = CursorKey::derive(&handover::crypto::DataKey::from_bytes([7; 32]));
        let c = Cursor {
            after: SortKey::Text("payment_0042".into()),
            offset: 5000,
        };
        let text = key.encode("export_1", "payment_history", &c);
        assert_eq!(
            key.decode("export_1", "payment_history", &text),
            Ok(c.clone())
        );
        let n = Cursor {
            after: SortKey::Int(-3),
            offset: 0,
        };
        let t2 = key.encode("export_1", "t", &n);
        assert_eq!(key.decode("export_1", "t", &t2), Ok(n));
        for bad in [
            key.decode("export_2", "payment_history", &text),
            key.decode("export_1", "recovery_cases", &text),
            key.decode("export_1", "payment_history", &format!(" {text}")),
            key.decode("export_1", "payment_history", &format!("{text}=")),
            key.decode("export_1", "payment_history", &text.replace('.', "..")),
            key.decode("export_1", "payment_history", ""),
            key.decode("export_1", "payment_history", "garbage"),
        ] {
            assert_eq!(bad, Err(BadCursor));
        }
        // A cursor re-signed with another key is refused.
        let other = CursorKey::derive(&handover::crypto::DataKey::from_bytes([8; 32]));
        assert_eq!(
            key.decode(
                "export_1",
                "payment_history",
                &other.encode("export_1", "payment_history", &c)
            ),
            Err(BadCursor)
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn key() -> CursorKey {
        CursorKey::derive(&handover::crypto::DataKey::from_bytes([9; 32]))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_cursor_round_trips(text in ".{0,40}", int in any::<i64>(), offset in any::<u64>(), is_text in any::<bool>()) {
            let after = if is_text { SortKey::Text(text) } else { SortKey::Int(int) };
            let c = Cursor { after, offset };
            let k = key();
            let encoded = k.encode("export_1", "t", &c);
            prop_assert_eq!(k.decode("export_1", "t", &encoded), Ok(c));
        }

        #[test]
        fn anything_else_is_refused_without_panicking(s in ".{0,120}") {
            // Only the server's own encodings decode; random text never does.
            prop_assert_eq!(key().decode("export_1", "t", &s), Err(BadCursor));
        }

        #[test]
        fn any_change_to_a_real_cursor_is_refused(offset in any::<u64>(), at in any::<prop::sample::Index>(), with in "[A-Za-z0-9_.= -]") {
            let k = key();
            let encoded = k.encode("export_1", "t", &Cursor { after: SortKey::Int(7), offset });
            let i = at.index(encoded.len());
            let mut changed = encoded.clone();
            changed.replace_range(i..=i, &with);
            prop_assume!(changed != encoded);
            prop_assert_eq!(k.decode("export_1", "t", &changed), Err(BadCursor));
        }
    }
}
