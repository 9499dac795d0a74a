//! The framing of each stream of the TLS-over-TCP transport, as a pure codec: bytes in, events
//! out, no I/O.
//!
//! yamux reads a peer's reset as a clean end of stream, so each stream carries a small framing
//! of its own that restores the meaning of finish and reset that QUIC has:
//!
//! ```text
//! DATA:  0x00, length u32 (BE), that many bytes
//! FIN:   0x01                  (end of stream: the half-close)
//! RESET: 0x02, code u32 (BE)   (the stream was abandoned with this code)
//! ```
//!
//! The decoder keeps only the count of DATA bytes still due; everything else stays in the
//! caller's buffer until a whole header is there, so a read that is cancelled loses nothing.

use bytes::{Buf, Bytes, BytesMut};

pub const DATA: u8 = 0;
pub const FIN: u8 = 1;
pub const RESET: u8 = 2;

/// What the next bytes of a stream mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Payload bytes, in order.
    Data(Bytes),
    /// The sender finished the stream.
    Fin,
    /// The sender abandoned the stream with this code.
    Reset(u32),
}

/// A byte that begins no frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad stream framing byte {0:#x}")]
pub struct FramingError(pub u8);

/// Decodes one stream's frames.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    /// Bytes of the current DATA frame not yet handed out.
    left: usize,
}

impl Decoder {
    /// The next event from `buf`, taking what it uses; `Ok(None)` when `buf` needs more bytes.
    /// A DATA event carries at most `max` bytes (at least one) and may be part of a frame.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Option<Event>, FramingError> {
        loop {
            if self.left > 0 {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = self.left.min(buf.len()).min(max.max(1));
                self.left -= n;
                return Ok(Some(Event::Data(buf.split_to(n).freeze())));
            }
            let Some(&kind) = buf.first() else {
                return Ok(None);
            };
            match kind {
                DATA => {
                    if buf.len() < 5 {
                        return Ok(None);
                    }
                    buf.advance(1);
                    self.left = buf.get_u32() as usize;
                    // An empty DATA frame carries nothing: read on.
                }
                FIN => {
                    buf.advance(1);
                    return Ok(Some(Event::Fin));
                }
                RESET => {
                    if buf.len() < 5 {
                        return Ok(None);
                    }
                    buf.advance(1);
                    return Ok(Some(Event::Reset(buf.get_u32())));
                }
                other => return Err(FramingError(other)),
            }
        }
    }

    /// Whether the stream stopped inside a frame (its end then reads as a reset).
    pub fn mid_frame(&self, buf: &[u8]) -> bool {
        self.left > 0 || !buf.is_empty()
    }
}

/// The header of a DATA frame of `len` bytes.
pub fn data_header(len: u32) -> [u8; 5] {
    let mut head = [0u8; 5];
    head[0] = DATA;
    head[1..].copy_from_slice(&len.to_be_bytes());
    head
}

/// A RESET frame with `code`.
pub fn reset_frame(code: u32) -> [u8; 5] {
    let mut f = [0u8; 5];
    f[0] = RESET;
    f[1..].copy_from_slice(&code.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            match e {
                Event::Data(b) => {
                    out.extend_from_slice(&data_header(b.len() as u32));
                    out.extend_from_slice(b);
                }
                Event::Fin => out.push(FIN),
                Event::Reset(c) => out.extend_from_slice(&reset_frame(*c)),
            }
        }
        out
    }

    /// Feeds `bytes` in pieces of the given sizes, decoding as it goes.
    fn decode_in_pieces(bytes: &[u8], pieces: &[usize], max: usize) -> (Vec<u8>, Vec<Event>) {
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        let (mut data, mut ends) = (Vec::new(), Vec::new());
        let mut at = 0;
        let mut sizes = pieces.iter().cycle();
        while at < bytes.len() || !buf.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).max(1).min(bytes.len() - at);
            buf.extend_from_slice(&bytes[at..at + n]);
            at += n;
            while let Some(e) = d.decode(&mut buf, max).unwrap() {
                match e {
                    Event::Data(b) => {
                        assert!(!b.is_empty() && b.len() <= max.max(1));
                        data.extend_from_slice(&b);
                    }
                    other => ends.push(other),
                }
            }
            if n == 0 {
                break;
            }
        }
        (data, ends)
    }

    proptest! {
        #[test]
        fn frames_split_anywhere_decode_to_the_same_bytes(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            end in prop_oneof![Just(None), Just(Some(Event::Fin)), any::<u32>().prop_map(|c| Some(Event::Reset(c)))],
            pieces in proptest::collection::vec(1usize..40, 1..6),
            max in 1usize..200,
        ) {
            let mut events: Vec<Event> = chunks.iter().map(|c| Event::Data(Bytes::from(c.clone()))).collect();
            events.extend(end.clone());
            let bytes = encode(&events);
            let (data, ends) = decode_in_pieces(&bytes, &pieces, max);
            prop_assert_eq!(data, chunks.concat());
            prop_assert_eq!(ends, end.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_byte_that_begins_no_frame_is_an_error() {
        let mut buf = BytesMut::from(&[7u8, 0, 0][..]);
        assert_eq!(
            Decoder::default().decode(&mut buf, 10),
            Err(FramingError(7))
        );
    }

    #[test]
    fn an_end_inside_a_frame_is_seen() {
        let mut d = Decoder::default();
        let mut buf = BytesMut::from(&data_header(10)[..]);
        buf.extend_from_slice(b"abc");
        assert!(matches!(d.decode(&mut buf, 100), Ok(Some(Event::Data(_)))));
        assert_eq!(d.decode(&mut buf, 100), Ok(None));
        assert!(d.mid_frame(&buf));
        let mut half = BytesMut::from(&[RESET, 0][..]);
        let d = Decoder::default();
        assert!(d.mid_frame(&half));
        half.clear();
        assert!(!d.mid_frame(&half));
    }
}
