//! The IDX format of MNIST and Fashion-MNIST (plain or gzip): a big-endian header
//! `0x00 0x00 0x08 <rank>`, one u32 size per dimension, then the unsigned bytes.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// The largest IDX payload normlab reads (60,000 images of 28x28 are 47 MB).
pub const MAX_IDX_BYTES: usize = 2 << 30;

/// Reads an IDX file, decompressing when its name ends in `.gz` (every member of a multi-member
/// file, as pigz and bgzip write them); checks the magic number, the rank, and that the payload
/// length matches the dimensions exactly. Nothing is allocated before the header's sizes are
/// checked, and decompression stops one byte past the size the header implies, so neither a
/// lying header nor a gzip bomb can take the memory.
pub fn read_idx(path: &Path, expected_rank: usize) -> Result<IdxArray> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::data(path, "is not a regular file; give the IDX file itself"));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file = std::io::BufReader::new(file);
    let result = if path.extension().is_some_and(|e| e == "gz") {
        read_idx_from(
            flate2::read::MultiGzDecoder::new(file),
            Source::Gzip(meta.len()),
            expected_rank,
        )
        .map_err(|m| m.replace("read failed:", "corrupt gzip data:"))
    } else {
        read_idx_from(file, Source::Plain(meta.len()), expected_rank)
    };
    result.map_err(|m| Error::data(path, m))
}

/// Parses gzip-compressed IDX bytes, as `read_idx` reads a `.gz` file.
pub fn parse_idx_gz(bytes: &[u8], expected_rank: usize) -> std::result::Result<IdxArray, String> {
    read_idx_from(
        flate2::read::MultiGzDecoder::new(bytes),
        Source::Gzip(bytes.len() as u64),
        expected_rank,
    )
}

/// Parses IDX bytes; the error is a message without the path.
pub fn parse_idx(bytes: &[u8], expected_rank: usize) -> std::result::Result<IdxArray, String> {
    read_idx_from(bytes, Source::Plain(bytes.len() as u64), expected_rank)
}

/// What the IDX stream is read from, and its length on disk.
#[derive(Clone, Copy)]
enum Source {
    Plain(u64),
    Gzip(u64),
}

/// Deflate expands at most 1032:1; a header that promises more than its gzip file can hold
/// is refused before anything is read or allocated.
const MAX_DEFLATE_RATIO: u64 = 1032;

fn io_message(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::InvalidInput || e.kind() == std::io::ErrorKind::InvalidData {
        format!("corrupt gzip data: {e}")
    } else {
        format!("read failed: {e}")
    }
}

/// Reads as many bytes as `buf` holds, or fewer at the end of the stream; returns the count.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::result::Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_message(e)),
        }
    }
    Ok(n)
}

/// The IDX array in `r`; `len` is the stream's length when known (a plain file).
fn read_idx_from(mut r: impl Read, source: Source, expected_rank: usize) -> std::result::Result<IdxArray, String> {
    let len = match source {
        Source::Plain(l) => Some(l),
        Source::Gzip(_) => None,
    };
    let size = |got: usize| len.map_or(got as u64, |l| l);
    let mut magic = [0u8; 4];
    let got = read_full(&mut r, &mut magic)?;
    if got < 4 {
        return Err(format!("file is {} bytes, too short for an IDX header", size(got)));
    }
    if magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 {
        return Err(format!(
            "bad IDX magic number {:02x}{:02x}{:02x}{:02x} (expected 000008{:02x}: unsigned bytes)",
            magic[0], magic[1], magic[2], magic[3], expected_rank
        ));
    }
    let rank = magic[3] as usize;
    if rank != expected_rank {
        return Err(format!("IDX file has {rank} dimensions, expected {expected_rank}"));
    }
    let header = 4 + 4 * rank;
    let mut raw = vec![0u8; 4 * rank];
    let got = read_full(&mut r, &mut raw)?;
    if got < raw.len() {
        return Err(format!(
            "file is {} bytes, too short for a {rank}-dimensional IDX header",
            size(4 + got)
        ));
    }
    let dims: Vec<usize> = raw
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(count) = count.filter(|&c| c <= MAX_IDX_BYTES) else {
        return Err(format!(
            "IDX dimensions {dims:?} describe more than {MAX_IDX_BYTES} bytes (corrupt header?)"
        ));
    };
    if let Source::Gzip(compressed) = source {
        if count as u64 > compressed.saturating_mul(MAX_DEFLATE_RATIO) {
            return Err(format!(
                "IDX dimensions {dims:?} need {count} bytes, more than a gzip file of {compressed} bytes \
                 can hold (corrupt header?)"
            ));
        }
    }
    if let Some(l) = len {
        let payload = l.saturating_sub(header as u64);
        if payload != count as u64 {
            return Err(format!(
                "IDX dimensions {dims:?} need {count} bytes of data, file has {payload} (truncated or corrupt)"
            ));
        }
    }
    // Grown as the data arrive (a plain file's length is already checked; a gzip stream's is
    // not known), so a short stream costs only what it holds.
    let mut data = Vec::with_capacity(count.min(1 << 26));
    (&mut r).take(count as u64).read_to_end(&mut data).map_err(io_message)?;
    let got = data.len();
    if got < count {
        return Err(format!(
            "IDX dimensions {dims:?} need {count} bytes of data, file has {got} (truncated or corrupt)"
        ));
    }
    let mut extra = [0u8; 1];
    if read_full(&mut r, &mut extra)? > 0 {
        return Err(format!(
            "IDX dimensions {dims:?} need {count} bytes of data, the file has more (corrupt header?)"
        ));
    }
    Ok(IdxArray { dims, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(rank: u8, dims: &[u32], payload: usize) -> Vec<u8> {
        let mut b = vec![0, 0, 8, rank];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend(std::iter::repeat_n(7, payload));
        b
    }

    #[test]
    fn parses_a_well_formed_file() {
        let a = parse_idx(&idx(3, &[2, 3, 4], 24), 3).unwrap();
        assert_eq!(a.dims, vec![2, 3, 4]);
        assert_eq!(a.data.len(), 24);
    }

    #[test]
    fn rejects_bad_magic_rank_and_length() {
        let mut bad = idx(3, &[2, 3, 4], 24);
        bad[2] = 0x0d;
        assert!(parse_idx(&bad, 3).unwrap_err().contains("magic"));
        assert!(parse_idx(&idx(1, &[5], 5), 3).unwrap_err().contains("dimensions"));
        assert!(parse_idx(&idx(3, &[2, 3, 4], 23), 3).unwrap_err().contains("truncated"));
        assert!(parse_idx(&idx(3, &[2, 3, 4], 25), 3).unwrap_err().contains("25"));
        assert!(parse_idx(&[0, 0], 3).is_err());
        assert!(parse_idx(&idx(3, &[2], 0)[..8], 3).unwrap_err().contains("header"));
        // A header that promises 2^32 * 2^32 bytes is refused before anything is allocated.
        assert!(parse_idx(&idx(3, &[u32::MAX, u32::MAX, 2], 0), 3)
            .unwrap_err()
            .contains("more than"));
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn reads_every_member_of_a_multi_member_gzip() {
        let whole = idx(3, &[2, 3, 4], 24);
        // pigz/bgzip style: the same stream cut in two members, concatenated.
        let mut file = gz(&whole[..10]);
        file.extend(gz(&whole[10..]));
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x-idx3-ubyte.gz");
        crate::files::write_atomic(&p, &file).unwrap();
        let a = read_idx(&p, 3).unwrap();
        assert_eq!(a.dims, vec![2, 3, 4]);
        assert_eq!(a.data.len(), 24);
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_size_the_header_implies() {
        // 3 bytes promised, 64 MB of zeros behind them: one byte past the 3 is read.
        let mut bomb = idx(1, &[3], 0);
        bomb.extend(std::iter::repeat_n(0u8, 64 << 20));
        let mut counter = CountingReader {
            inner: std::io::Cursor::new(gz(&bomb)),
            read: 0,
        };
        let e = read_idx_from(
            flate2::read::MultiGzDecoder::new(&mut counter),
            Source::Gzip(1 << 20),
            1,
        )
        .unwrap_err();
        assert!(e.contains("more"), "{e}");
        assert!(counter.read < 1 << 20, "read {} compressed bytes", counter.read);
    }

    #[test]
    fn a_small_gzip_that_promises_gigabytes_is_refused_before_allocating() {
        // Found by cargo fuzz: a 60-byte .gz whose header promised 2 GiB made the reader
        // allocate them before reading. Deflate cannot expand 60 bytes that far.
        let e = parse_idx_gz(&gz(&idx(3, &[32768, 256, 256], 8)), 3).unwrap_err();
        assert!(e.contains("more than a gzip file"), "{e}");
    }

    struct CountingReader<R> {
        inner: R,
        read: usize,
    }

    impl<R: Read> Read for CountingReader<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }
}
