use sha2::{Digest, Sha256};

/// SHA-256 of a file that arrives in chunks (the writer's output), as the
/// lower-case hex the API reports in `complete`.
///
/// ```
/// let mut h = handover::Sha256Stream::default();
/// h.update(b"ab");
/// h.update(b"c");
/// assert_eq!(h.finish_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
/// ```
#[derive(Debug, Default, Clone)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    /// Adds the next chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    /// The digest as 64 lower-case hex digits.
    pub fn finish_hex(self) -> String {
        hex::encode(self.0.finalize())
    }
}
