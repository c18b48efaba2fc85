//! A small streaming zip writer for the XLSX package: entries are deflated
//! as their data arrives (sizes and CRC in a data descriptor after the
//! data), entries of another zip are copied in as they are, and the central
//! directory is written at the end. No seeking, so the package can go
//! straight into Blob parts or a file.

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::format::FormatError;

const LOCAL_HEADER: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR: u32 = 0x0807_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_CENTRAL_DIRECTORY: u32 = 0x0605_4b50;
/// The sizes are in a data descriptor after the data.
const FLAG_DESCRIPTOR: u16 = 1 << 3;
/// Names are UTF-8.
const FLAG_UTF8: u16 = 1 << 11;
const DEFLATE: u16 = 8;
/// 1980-01-01 00:00, as rust_xlsxwriter writes it: the same input gives the
/// same bytes.
const DOS_TIME: u16 = 0;
const DOS_DATE: u16 = (1 << 5) | 1;

/// Largest size or offset without Zip64, which this writer does not write.
pub(crate) const MAX_ZIP32: u64 = u32::MAX as u64;

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    flags: u16,
    method: u16,
    crc: u32,
    compressed: u64,
    uncompressed: u64,
    offset: u64,
}

/// The package being written.
#[derive(Debug, Default)]
pub(crate) struct ZipWriter {
    /// Bytes written so far (the offset of the next header).
    written: u64,
    entries: Vec<Entry>,
    /// Whether the package goes out as instructions for a [`ZipAssembler`]
    /// elsewhere (another worker) instead of as bytes: the deflating and
    /// checksumming then happen there, beside the writing of the rows.
    deferred: bool,
}

/// The steps of a deferred package, each a tag byte and its fields
/// (little-endian), as [`ZipAssembler::feed`] reads them.
mod op {
    /// Starts a deflated entry: level (u8), name length (u16), name.
    pub(super) const START: u8 = 1;
    /// Data of the open entry: length (u32), bytes.
    pub(super) const DATA: u8 = 2;
    /// Ends the open entry.
    pub(super) const END: u8 = 3;
    /// An entry copied as it is: flags (u16), method (u16), CRC (u32),
    /// uncompressed size (u64), name length (u16), name, data length
    /// (u32), data.
    pub(super) const COPY: u8 = 4;
    /// Ends the package (the central directory).
    pub(super) const FINISH: u8 = 5;
}

/// The deflate stream and checksum of an entry deflated here.
struct Deflating {
    deflate: Compress,
    crc: crc32fast::Hasher,
}

/// An entry whose data is deflated as it arrives.
pub(crate) struct DeflatedEntry {
    name: String,
    offset: u64,
    /// `None` when the package is deferred: the data goes out as it is.
    here: Option<Deflating>,
    /// Data not yet deflated: rows arrive a few hundred bytes at a time, and
    /// one deflate call per row cost more than the deflating itself.
    pending: Vec<u8>,
    /// Uncompressed bytes deflated (or sent on) so far.
    passed: u64,
}

/// How much data an entry collects before deflating it.
const PENDING_BYTES: usize = 128 * 1024;

impl std::fmt::Debug for DeflatedEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeflatedEntry")
            .field("name", &self.name)
            .field("in", &self.uncompressed())
            .field("deferred", &self.here.is_none())
            .finish()
    }
}

fn too_large() -> FormatError {
    FormatError::Xlsx("the workbook would exceed 4 GiB, the limit of a zip without Zip64".into())
}

fn u16le(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn u32le(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn zip32(v: u64) -> Result<u32, FormatError> {
    u32::try_from(v).map_err(|_| too_large())
}

fn length_u16(n: usize) -> Result<u16, FormatError> {
    u16::try_from(n).map_err(|_| FormatError::Xlsx("a zip entry name is too long".into()))
}

impl ZipWriter {
    /// A writer whose package goes out as instructions for a
    /// [`ZipAssembler`] (see [`ExportWriter::defer_zip`](crate::format::ExportWriter::defer_zip)).
    pub(crate) fn deferred() -> Self {
        Self {
            deferred: true,
            ..Self::default()
        }
    }

    fn local_header(&self, e: &Entry, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let known = e.flags & FLAG_DESCRIPTOR == 0;
        u32le(out, LOCAL_HEADER);
        u16le(out, 20); // version needed: 2.0 (deflate)
        u16le(out, e.flags);
        u16le(out, e.method);
        u16le(out, DOS_TIME);
        u16le(out, DOS_DATE);
        u32le(out, if known { e.crc } else { 0 });
        u32le(out, if known { zip32(e.compressed)? } else { 0 });
        u32le(out, if known { zip32(e.uncompressed)? } else { 0 });
        u16le(out, e.name.len() as u16);
        u16le(out, 0); // no extra field
        out.extend_from_slice(e.name.as_bytes());
        Ok(())
    }

    /// Starts an entry whose data is deflated (at `level`, 0–9) as it arrives.
    pub(crate) fn start_deflated(
        &mut self,
        name: &str,
        level: u32,
        out: &mut Vec<u8>,
    ) -> Result<DeflatedEntry, FormatError> {
        if self.deferred {
            out.push(op::START);
            out.push(level.min(9) as u8);
            u16le(out, length_u16(name.len())?);
            out.extend_from_slice(name.as_bytes());
            return Ok(DeflatedEntry {
                name: name.to_string(),
                offset: 0,
                here: None,
                pending: Vec::with_capacity(PENDING_BYTES),
                passed: 0,
            });
        }
        let e = Entry {
            name: name.to_string(),
            flags: FLAG_DESCRIPTOR | FLAG_UTF8,
            method: DEFLATE,
            crc: 0,
            compressed: 0,
            uncompressed: 0,
            offset: self.written,
        };
        let before = out.len();
        self.local_header(&e, out)?;
        self.written += (out.len() - before) as u64;
        Ok(DeflatedEntry {
            name: name.to_string(),
            offset: e.offset,
            here: Some(Deflating {
                deflate: Compress::new(Compression::new(level), false),
                crc: crc32fast::Hasher::new(),
            }),
            pending: Vec::with_capacity(PENDING_BYTES),
            passed: 0,
        })
    }

    /// Ends a deflated entry: the rest of its data and its data descriptor.
    pub(crate) fn finish_deflated(
        &mut self,
        mut entry: DeflatedEntry,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let before = out.len();
        entry.flush_pending(FlushCompress::Finish, out)?;
        let Some(here) = entry.here else {
            out.push(op::END);
            return Ok(());
        };
        let e = Entry {
            name: entry.name,
            flags: FLAG_DESCRIPTOR | FLAG_UTF8,
            method: DEFLATE,
            crc: here.crc.finalize(),
            compressed: here.deflate.total_out(),
            uncompressed: here.deflate.total_in(),
            offset: entry.offset,
        };
        u32le(out, DATA_DESCRIPTOR);
        u32le(out, e.crc);
        u32le(out, zip32(e.compressed)?);
        u32le(out, zip32(e.uncompressed)?);
        self.written += (out.len() - before) as u64;
        self.entries.push(e);
        Ok(())
    }

    /// Copies an entry of another zip as it is (compressed data, CRC, sizes).
    pub(crate) fn copy(
        &mut self,
        from: &CopiedEntry<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if self.deferred {
            out.push(op::COPY);
            u16le(out, from.flags);
            u16le(out, from.method);
            u32le(out, from.crc);
            out.extend_from_slice(&from.uncompressed.to_le_bytes());
            u16le(out, length_u16(from.name.len())?);
            out.extend_from_slice(from.name.as_bytes());
            u32le(out, zip32(from.data.len() as u64)?);
            out.extend_from_slice(from.data);
            return Ok(());
        }
        let e = Entry {
            name: from.name.to_string(),
            flags: from.flags & FLAG_UTF8,
            method: from.method,
            crc: from.crc,
            compressed: from.data.len() as u64,
            uncompressed: from.uncompressed,
            offset: self.written,
        };
        let before = out.len();
        self.local_header(&e, out)?;
        out.extend_from_slice(from.data);
        self.written += (out.len() - before) as u64;
        self.entries.push(e);
        Ok(())
    }

    /// Writes the central directory: the package is complete.
    pub(crate) fn finish(self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        if self.deferred {
            out.push(op::FINISH);
            return Ok(());
        }
        let start = self.written;
        let before = out.len();
        for e in &self.entries {
            u32le(out, CENTRAL_HEADER);
            u16le(out, 20); // made by: 2.0, MS-DOS attributes
            u16le(out, 20);
            u16le(out, e.flags);
            u16le(out, e.method);
            u16le(out, DOS_TIME);
            u16le(out, DOS_DATE);
            u32le(out, e.crc);
            u32le(out, zip32(e.compressed)?);
            u32le(out, zip32(e.uncompressed)?);
            u16le(out, e.name.len() as u16);
            u16le(out, 0); // extra
            u16le(out, 0); // comment
            u16le(out, 0); // disk
            u16le(out, 0); // internal attributes
            u32le(out, 0); // external attributes
            u32le(out, zip32(e.offset)?);
            out.extend_from_slice(e.name.as_bytes());
        }
        let size = (out.len() - before) as u64;
        let count = u16::try_from(self.entries.len()).map_err(|_| too_large())?;
        u32le(out, END_OF_CENTRAL_DIRECTORY);
        u16le(out, 0);
        u16le(out, 0);
        u16le(out, count);
        u16le(out, count);
        u32le(out, zip32(size)?);
        u32le(out, zip32(start)?);
        u16le(out, 0); // comment length
        Ok(())
    }

    /// Counts bytes written by a deflated entry's `write` (a deferred
    /// package is counted, and held to the limit, where it is assembled).
    pub(crate) fn wrote(&mut self, n: usize) -> Result<(), FormatError> {
        if self.deferred {
            return Ok(());
        }
        self.written += n as u64;
        if self.written > MAX_ZIP32 {
            return Err(too_large());
        }
        Ok(())
    }
}

impl DeflatedEntry {
    /// Adds data; the deflated bytes that are ready go to `out`. Returns how
    /// many bytes were added to `out`.
    pub(crate) fn write(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, FormatError> {
        if self.pending.len() + data.len() <= PENDING_BYTES {
            self.pending.extend_from_slice(data);
            return Ok(0);
        }
        let before = out.len();
        self.flush_pending(FlushCompress::None, out)?;
        if data.len() > PENDING_BYTES {
            self.pass(data, FlushCompress::None, out)?;
        } else {
            self.pending.extend_from_slice(data);
        }
        Ok(out.len() - before)
    }

    /// Deflates (and checksums) the pending data; the buffer is kept for
    /// the next rows.
    fn flush_pending(
        &mut self,
        flush: FlushCompress,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let pending = std::mem::take(&mut self.pending);
        let passed = self.pass(&pending, flush, out);
        self.pending = pending;
        self.pending.clear();
        passed
    }

    /// Deflates and checksums `data` here, or sends it on as it is when
    /// the package is deferred.
    fn pass(
        &mut self,
        data: &[u8],
        flush: FlushCompress,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        self.passed += data.len() as u64;
        let Some(here) = self.here.as_mut() else {
            // Pieces of at most 1 GiB, so each length fits its field.
            for piece in data.chunks(1 << 30) {
                out.push(op::DATA);
                u32le(out, piece.len() as u32);
                out.extend_from_slice(piece);
            }
            return Ok(());
        };
        here.crc.update(data);
        here.deflate(data, flush, out)
    }

    /// Uncompressed bytes so far.
    pub(crate) fn uncompressed(&self) -> u64 {
        self.passed + self.pending.len() as u64
    }
}

impl Deflating {
    fn deflate(
        &mut self,
        mut data: &[u8],
        flush: FlushCompress,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        loop {
            if out.capacity() - out.len() < 32 * 1024 {
                out.reserve(64 * 1024);
            }
            let (in_before, out_before) = (self.deflate.total_in(), self.deflate.total_out());
            let status = self
                .deflate
                .compress_vec(data, out, flush)
                .map_err(|e| FormatError::Xlsx(format!("deflate: {e}")))?;
            let consumed = (self.deflate.total_in() - in_before) as usize;
            data = &data[consumed..];
            let finishing = matches!(flush, FlushCompress::Finish);
            if (finishing && status == Status::StreamEnd) || (!finishing && data.is_empty()) {
                return Ok(());
            }
            if consumed == 0 && self.deflate.total_out() == out_before && out.len() < out.capacity()
            {
                return Err(FormatError::Xlsx("deflate made no progress".into()));
            }
        }
    }
}

/// An entry of an existing zip, ready to be copied.
#[derive(Debug)]
pub(crate) struct CopiedEntry<'z> {
    pub(crate) name: &'z str,
    flags: u16,
    method: u16,
    crc: u32,
    uncompressed: u64,
    data: &'z [u8],
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The entries of a (small, non-Zip64) zip, from its central directory.
///
/// # Errors
///
/// [`FormatError::Xlsx`] for anything that is not such a zip.
pub(crate) fn read_entries(zip: &[u8]) -> Result<Vec<CopiedEntry<'_>>, FormatError> {
    let bad = || FormatError::Xlsx("the workbook frame is not a readable zip".into());
    let eocd = (0..zip.len().saturating_sub(21))
        .rev()
        .find(|&i| le32(zip, i) == Some(END_OF_CENTRAL_DIRECTORY))
        .ok_or_else(bad)?;
    let count = le16(zip, eocd + 10).ok_or_else(bad)? as usize;
    let mut at = le32(zip, eocd + 16).ok_or_else(bad)? as usize;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        if le32(zip, at) != Some(CENTRAL_HEADER) {
            return Err(bad());
        }
        let flags = le16(zip, at + 8).ok_or_else(bad)?;
        let method = le16(zip, at + 10).ok_or_else(bad)?;
        let crc = le32(zip, at + 16).ok_or_else(bad)?;
        let compressed = le32(zip, at + 20).ok_or_else(bad)? as usize;
        let uncompressed = u64::from(le32(zip, at + 24).ok_or_else(bad)?);
        let name_len = le16(zip, at + 28).ok_or_else(bad)? as usize;
        let extra_len = le16(zip, at + 30).ok_or_else(bad)? as usize;
        let comment_len = le16(zip, at + 32).ok_or_else(bad)? as usize;
        let local = le32(zip, at + 42).ok_or_else(bad)? as usize;
        let name = zip
            .get(at + 46..at + 46 + name_len)
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or_else(bad)?;
        if le32(zip, local) != Some(LOCAL_HEADER) {
            return Err(bad());
        }
        let data_at = local
            + 30
            + le16(zip, local + 26).ok_or_else(bad)? as usize
            + le16(zip, local + 28).ok_or_else(bad)? as usize;
        let data = zip.get(data_at..data_at + compressed).ok_or_else(bad)?;
        entries.push(CopiedEntry {
            name,
            flags,
            method,
            crc,
            uncompressed,
            data,
        });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// The uncompressed data of a copied entry (to check the workbook frame).
///
/// # Errors
///
/// [`FormatError::Xlsx`] when it does not inflate.
pub(crate) fn inflate(entry: &CopiedEntry<'_>) -> Result<Vec<u8>, FormatError> {
    if entry.method == 0 {
        return Ok(entry.data.to_vec());
    }
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(entry.uncompressed as usize);
    d.decompress_vec(entry.data, &mut out, flate2::FlushDecompress::Finish)
        .map_err(|e| FormatError::Xlsx(format!("inflate {}: {e}", entry.name)))?;
    Ok(out)
}

/// Builds the zip package from the instructions of a deferred
/// [`ExportWriter`](crate::format::ExportWriter) (see
/// [`ExportWriter::defer_zip`](crate::format::ExportWriter::defer_zip)):
/// it deflates and checksums the entries' data, so that this work can run
/// in another thread (the browser's second worker) while the rows are
/// written. Fed the writer's outputs in order, it gives the same bytes as
/// the writer would have.
#[derive(Debug, Default)]
pub struct ZipAssembler {
    zip: ZipWriter,
    entry: Option<DeflatedEntry>,
    finished: bool,
    /// An error left the package unusable: every later feed is refused.
    failed: bool,
}

/// Reads the fields of one instruction.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(malformed("an instruction is cut short"));
        };
        let piece = &self.bytes[self.at..end];
        self.at = end;
        Ok(piece)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from(self.u32()?) | (u64::from(self.u32()?) << 32))
    }

    fn name(&mut self) -> Result<&'a str, FormatError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| malformed("an entry name is not UTF-8"))
    }
}

fn malformed(what: &str) -> FormatError {
    FormatError::Xlsx(format!("the package instructions are malformed: {what}"))
}

impl ZipAssembler {
    /// An assembler at the start of a package.
    ///
    /// ```
    /// let a = handover::format::ZipAssembler::new();
    /// assert!(!a.is_finished());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one output of the deferred writer (whole instructions, as
    /// `take_output`, `begin` and `finish` return them) and appends the
    /// package bytes that are ready to `out`.
    ///
    /// # Errors
    ///
    /// [`FormatError::Xlsx`] when the instructions are malformed or out of
    /// order, or the package would pass 4 GiB (no Zip64).
    ///
    /// ```
    /// use handover::format::{ExportFormat, ExportWriter, FormatOptions, ZipAssembler};
    /// use handover::model::{ExportInfo, Manifest};
    /// let info = ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
    /// let mut w = ExportWriter::new(ExportFormat::Xlsx, &Manifest::default(), &info, &FormatOptions::default()).unwrap();
    /// assert!(w.defer_zip());
    /// let mut a = ZipAssembler::new();
    /// let mut file = Vec::new();
    /// a.feed(&w.begin().unwrap(), &mut file).unwrap();
    /// a.feed(&w.finish().unwrap(), &mut file).unwrap();
    /// assert!(a.is_finished());
    /// assert_eq!(&file[..2], b"PK");
    /// ```
    pub fn feed(&mut self, ops: &[u8], out: &mut Vec<u8>) -> Result<(), FormatError> {
        if self.failed {
            return Err(malformed("an earlier instruction failed"));
        }
        let fed = self.apply(ops, out);
        self.failed = fed.is_err();
        fed
    }

    fn apply(&mut self, ops: &[u8], out: &mut Vec<u8>) -> Result<(), FormatError> {
        let mut r = Reader { bytes: ops, at: 0 };
        while r.at < ops.len() {
            if self.finished {
                return Err(malformed("instructions after the end of the package"));
            }
            match r.u8()? {
                op::START => {
                    let level = u32::from(r.u8()?);
                    if level > 9 {
                        return Err(malformed("a deflate level above 9"));
                    }
                    let name = r.name()?;
                    if self.entry.is_some() {
                        return Err(malformed("an entry starts inside another"));
                    }
                    self.entry = Some(self.zip.start_deflated(name, level, out)?);
                }
                op::DATA => {
                    let n = r.u32()? as usize;
                    let data = r.take(n)?;
                    let entry = self
                        .entry
                        .as_mut()
                        .ok_or_else(|| malformed("data outside an entry"))?;
                    let wrote = entry.write(data, out)?;
                    self.zip.wrote(wrote)?;
                }
                op::END => {
                    let entry = self
                        .entry
                        .take()
                        .ok_or_else(|| malformed("an entry ends that did not start"))?;
                    self.zip.finish_deflated(entry, out)?;
                }
                op::COPY => {
                    let (flags, method, crc) = (r.u16()?, r.u16()?, r.u32()?);
                    let uncompressed = r.u64()?;
                    let name = r.name()?;
                    let n = r.u32()? as usize;
                    let data = r.take(n)?;
                    if self.entry.is_some() {
                        return Err(malformed("an entry is copied inside another"));
                    }
                    let from = CopiedEntry {
                        name,
                        flags,
                        method,
                        crc,
                        uncompressed,
                        data,
                    };
                    self.zip.copy(&from, out)?;
                }
                op::FINISH => {
                    if self.entry.is_some() {
                        return Err(malformed("the package ends inside an entry"));
                    }
                    std::mem::take(&mut self.zip).finish(out)?;
                    self.finished = true;
                }
                _ => return Err(malformed("an unknown instruction")),
            }
        }
        Ok(())
    }

    /// Whether the package is complete (its central directory written).
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}
