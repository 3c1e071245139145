//! The deterministic byte pattern of `/download` and `upload`.
//!
//! Byte `i` of a body is `(i * 31 + 7) % 251`. 251 is prime, so the pattern has
//! period 251 and is not aligned with any power-of-two chunk size: a lost,
//! duplicated or reordered chunk shows up as a mismatch.

use std::convert::Infallible;
use std::sync::OnceLock;

use bytes::Bytes;
use futures::Stream;
use hyper::body::Frame;

/// The pattern's period.
const PERIOD: usize = 251;
/// Size of the chunks a pattern body is streamed in.
pub const CHUNK: usize = 64 * 1024;

/// Byte `i` of the pattern.
pub fn byte_at(i: u64) -> u8 {
    // Reduce first so that huge offsets do not overflow.
    (((i % PERIOD as u64) * 31 + 7) % PERIOD as u64) as u8
}

/// The pattern from 0 to CHUNK + PERIOD: any chunk of up to CHUNK bytes is a slice of it.
fn periodic() -> &'static Bytes {
    static BUF: OnceLock<Bytes> = OnceLock::new();
    BUF.get_or_init(|| (0..(CHUNK + PERIOD) as u64).map(byte_at).collect())
}

/// The `len` (at most CHUNK) pattern bytes starting at `offset`, without copying.
pub fn slice(offset: u64, len: usize) -> Bytes {
    let start = (offset % PERIOD as u64) as usize;
    periodic().slice(start..start + len.min(CHUNK))
}

/// `total` pattern bytes as a stream of body frames of at most CHUNK bytes.
pub fn frames(total: u64) -> impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    futures::stream::unfold(0u64, move |offset| async move {
        if offset >= total {
            return None;
        }
        let len = (total - offset).min(CHUNK as u64) as usize;
        Some((Ok(Frame::data(slice(offset, len))), offset + len as u64))
    })
}

/// SHA-256 (lowercase hex) of the first `total` pattern bytes.
pub fn sha256_hex(total: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut offset = 0;
    while offset < total {
        let len = (total - offset).min(CHUNK as u64) as usize;
        ctx.update(&slice(offset, len));
        offset += len as u64;
    }
    hex(ctx.finish().as_ref())
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a body against the pattern as it streams in.
#[derive(Debug, Default)]
pub struct Verifier {
    /// Bytes seen so far.
    pub len: u64,
    /// Offset of the first byte that differs from the pattern.
    pub first_mismatch: Option<u64>,
}

impl Verifier {
    /// Feeds the next piece of the body.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = data.len().min(CHUNK);
            if self.first_mismatch.is_none() {
                let expected = slice(self.len, n);
                // Slice equality is a memcmp, fast even unoptimized: search only on a mismatch.
                if data[..n] != expected[..] {
                    let at = data[..n]
                        .iter()
                        .zip(expected.iter())
                        .position(|(a, b)| a != b);
                    self.first_mismatch = Some(self.len + at.unwrap_or(0) as u64);
                }
            }
            self.len += n as u64;
            data = &data[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn generator() {
        assert_eq!(byte_at(0), 7);
        assert_eq!(byte_at(1), 38);
        assert_eq!(byte_at(8), 4);
        assert_eq!(byte_at(9), 35); // 286 % 251
        assert_eq!(byte_at(251), byte_at(0));
        assert_eq!(byte_at(u64::MAX), (((u64::MAX % 251) * 31 + 7) % 251) as u8);
        let s = slice(1000, 300);
        assert!(
            s.iter()
                .enumerate()
                .all(|(i, b)| *b == byte_at(1000 + i as u64))
        );
        assert_eq!(slice(0, CHUNK * 2).len(), CHUNK);
    }

    #[tokio::test]
    async fn frames_and_verifier_agree() {
        let total = 3 * CHUNK as u64 + 17;
        let mut v = Verifier::default();
        let mut frames = std::pin::pin!(frames(total));
        let mut count = 0;
        while let Some(Ok(frame)) = frames.next().await {
            count += 1;
            if let Some(d) = frame.data_ref() {
                // Feed in odd pieces, as a network would deliver them.
                for piece in d.chunks(1000) {
                    v.feed(piece);
                }
            }
        }
        assert_eq!(count, 4);
        assert_eq!(v.len, total);
        assert_eq!(v.first_mismatch, None);

        let mut bad = Verifier::default();
        let mut data: Vec<u8> = (0..600).map(byte_at).collect();
        data[555] ^= 1;
        bad.feed(&data);
        assert_eq!(bad.first_mismatch, Some(555));
    }

    #[test]
    fn digest() {
        // sha256 of the empty string.
        assert_eq!(
            sha256_hex(0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let all: Vec<u8> = (0..200_000).map(byte_at).collect();
        let direct = ring::digest::digest(&ring::digest::SHA256, &all);
        assert_eq!(sha256_hex(200_000), hex(direct.as_ref()));
    }
}
