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

/// Reads an IDX file, decompressing when its name ends in `.gz`; checks the magic number, the
/// rank, and that the payload length matches the dimensions exactly.
pub fn read_idx(path: &Path, expected_rank: usize) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::data(path, format!("corrupt gzip data: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes, expected_rank).map_err(|m| Error::data(path, m))
}

/// Parses IDX bytes; the error is a message without the path.
pub fn parse_idx(bytes: &[u8], expected_rank: usize) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!("file is {} bytes, too short for an IDX header", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(format!(
            "bad IDX magic number {:02x}{:02x}{:02x}{:02x} (expected 000008{:02x}: unsigned bytes)",
            bytes[0], bytes[1], bytes[2], bytes[3], expected_rank
        ));
    }
    let rank = bytes[3] as usize;
    if rank != expected_rank {
        return Err(format!("IDX file has {rank} dimensions, expected {expected_rank}"));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(format!(
            "file is {} bytes, too short for a {rank}-dimensional IDX header",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(count) = count else {
        return Err(format!("IDX dimensions {dims:?} overflow"));
    };
    let payload = bytes.len() - header;
    if payload != count {
        return Err(format!(
            "IDX dimensions {dims:?} need {count} bytes of data, file has {payload} (truncated or corrupt)"
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
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
    }
}
