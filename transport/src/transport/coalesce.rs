//! Joins a frame header to the body that follows it, so that both leave in one TLS record.
//!
//! yamux writes each frame as two writes, its 12-byte header and then the body, and every write
//! into a rustls stream becomes a TLS record of its own and a `write` on the socket. With
//! `TCP_NODELAY` (which the tunnel needs for its latency) each header thus left as a segment of
//! ~35 bytes, and the peer decrypted two records per frame. [`Coalesce`] holds a small write back
//! and hands it to TLS together with the next one, as one vectored write (one record, no copy);
//! a flush sends what it holds. yamux flushes after every frame, so nothing waits.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes up to this size are held for the next one: a yamux header is 12 bytes.
const HELD: usize = 16;

/// A writer that joins each small write to the next (see the module's doc). Reads pass through.
pub struct Coalesce<T> {
    inner: T,
    held: [u8; HELD],
    /// Bytes at the start of `held` not yet written to `inner`.
    len: usize,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            held: [0; HELD],
            len: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Drops the first `n` held bytes (written).
    fn consume(&mut self, n: usize) {
        self.held.copy_within(n..self.len, 0);
        self.len -= n;
    }

    /// Writes out what is held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.len > 0 {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[..self.len]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.len == 0 && buf.len() <= HELD {
            this.held[..buf.len()].copy_from_slice(buf);
            this.len = buf.len();
            return Poll::Ready(Ok(buf.len()));
        }
        // Something is held: it goes first, in the same write as `buf`. The result counts the
        // held bytes first; a write that took only (part of) them is tried again at once.
        while this.len > 0 {
            let bufs = [
                io::IoSlice::new(&this.held[..this.len]),
                io::IoSlice::new(buf),
            ];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n > this.len {
                let of_buf = n - this.len;
                this.len = 0;
                return Poll::Ready(Ok(of_buf));
            }
            this.consume(n);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A writer that records each write it is given, as one entry.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = joined.len();
            self.get_mut().0.push(joined);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_header_leaves_with_its_body_and_a_flush_sends_a_lone_one() {
        let mut w = Coalesce::new(Writes::default());
        w.write_all(b"header").await.unwrap();
        w.write_all(b"the body of the frame").await.unwrap();
        w.write_all(b"window").await.unwrap();
        assert_eq!(w.inner.0, vec![b"headerthe body of the frame".to_vec()]);
        w.flush().await.unwrap();
        assert_eq!(w.inner.0.len(), 2);
        assert_eq!(w.inner.0[1], b"window");
    }

    #[tokio::test]
    async fn bytes_arrive_in_order_whatever_the_writes() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = Coalesce::new(a);
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut rest = &sent[..];
            let mut k = 1;
            while !rest.is_empty() {
                let n = k.min(rest.len());
                w.write_all(&rest[..n]).await.unwrap();
                rest = &rest[n..];
                k = k % 37 + 1;
            }
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, data);
    }
}
