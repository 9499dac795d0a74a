//! The codec: messages to framed bytes and back, written for hostile input (see the crate's
//! doc).

use crate::message::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Why bytes could not be decoded. Every variant is a protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame body of {0} bytes exceeds the limit of {MAX_FRAME_BODY}")]
    FrameTooLarge(usize),
    #[error("{msg} frame is truncated")]
    Truncated { msg: &'static str },
    #[error("{msg} frame has {extra} trailing bytes")]
    TrailingBytes { msg: &'static str, extra: usize },
    #[error("{msg} frame has a string that is not UTF-8")]
    BadUtf8 { msg: &'static str },
    #[error("{msg} frame has a list of {count} items, more than {MAX_LIST_ITEMS}")]
    TooManyItems { msg: &'static str, count: usize },
    #[error("{msg} frame has an unknown target kind {kind}")]
    BadTargetKind { msg: &'static str, kind: u8 },
    #[error("{msg} frame has a bad boolean {value}")]
    BadBool { msg: &'static str, value: u8 },
    /// A record frame with addresses whose list is empty: a record without addresses travels
    /// as the older frame kind, so that every message has one encoding.
    #[error("{msg} frame has an empty address list")]
    EmptyAddresses { msg: &'static str },
}

/// Why a message could not be encoded. Only oversized content can cause it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{0} message body exceeds {MAX_FRAME_BODY} bytes")]
    TooLarge(&'static str),
    #[error("{0} message has a string longer than 65535 bytes")]
    StringTooLong(&'static str),
    #[error("{0} message has a list longer than {MAX_LIST_ITEMS} items")]
    TooManyItems(&'static str),
    #[error("unknown messages cannot be encoded")]
    Unknown,
}

/// Appends one framed message to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
    let name = msg.name();
    let mut body = BytesMut::new();
    let kind = match msg {
        Message::Hello {
            min_version,
            max_version,
            node_name,
            capabilities,
        } => {
            body.put_u8(*min_version);
            body.put_u8(*max_version);
            put_str(&mut body, node_name, name)?;
            put_str_list(&mut body, capabilities, name)?;
            kind::HELLO
        }
        Message::Welcome {
            version,
            server_id,
            capabilities,
        } => {
            body.put_u8(*version);
            put_str(&mut body, server_id, name)?;
            put_str_list(&mut body, capabilities, name)?;
            kind::WELCOME
        }
        Message::ServerList { servers } => {
            put_count(&mut body, servers.len(), name)?;
            for s in servers {
                put_str(&mut body, &s.addr, name)?;
                body.put_u8(s.healthy as u8);
                body.put_u8(s.draining as u8);
            }
            kind::SERVER_LIST
        }
        Message::Health { upstream_healthy } => {
            body.put_u8(*upstream_healthy as u8);
            kind::HEALTH
        }
        Message::Drain => kind::DRAIN,
        Message::Ping { nonce } => {
            body.put_u64(*nonce);
            kind::PING
        }
        Message::Pong { nonce } => {
            body.put_u64(*nonce);
            kind::PONG
        }
        Message::Clock { unix_ms } => {
            body.put_u64(*unix_ms);
            kind::CLOCK
        }
        Message::RenewNow { issuer, trusted } => {
            put_str(&mut body, issuer, name)?;
            put_str_list(&mut body, trusted, name)?;
            kind::RENEW_NOW
        }
        Message::ServerDown { server_id } => {
            put_str(&mut body, server_id, name)?;
            kind::SERVER_DOWN
        }
        Message::NodeInfo { addresses } => {
            put_str_list(&mut body, addresses, name)?;
            kind::NODE_INFO
        }
        Message::Open {
            version,
            target,
            hops,
        } => {
            body.put_u8(*version);
            match target {
                Target::Service(s) => {
                    body.put_u8(0);
                    put_str(&mut body, s, name)?;
                }
                Target::Address { host, port } => {
                    body.put_u8(1);
                    put_str(&mut body, host, name)?;
                    body.put_u16(*port);
                }
            }
            body.put_u8(*hops);
            kind::OPEN
        }
        Message::Status { code, message } => {
            body.put_u8(code.to_u8());
            put_str(&mut body, message, name)?;
            kind::STATUS
        }
        Message::NodeRecord {
            name: n,
            state,
            at_ms,
        } => {
            put_str(&mut body, n, name)?;
            put_record_state(&mut body, state, name)?;
            body.put_u64(*at_ms);
            kind::NODE_RECORD
        }
        Message::NodeRecordV2 {
            name: n,
            state,
            epoch,
            version,
            writer,
            at_ms,
            previous,
            seen,
            addresses,
        } => {
            put_str(&mut body, n, name)?;
            put_record_state(&mut body, state, name)?;
            body.put_u32(*epoch);
            body.put_u64(*version);
            put_str(&mut body, writer, name)?;
            body.put_u64(*at_ms);
            put_str(&mut body, previous, name)?;
            body.put_u8(u8::from(*seen));
            if addresses.is_empty() {
                kind::NODE_RECORD_V2
            } else {
                put_str_list(&mut body, addresses, name)?;
                kind::NODE_RECORD_V3
            }
        }
        Message::Join {
            token_id,
            secret,
            node_name,
            csr,
        } => {
            put_str(&mut body, token_id, name)?;
            put_str(&mut body, secret, name)?;
            put_str(&mut body, node_name, name)?;
            put_bytes(&mut body, csr, name)?;
            kind::JOIN
        }
        Message::Renew { csr } => {
            put_bytes(&mut body, csr, name)?;
            kind::RENEW
        }
        Message::Certificate {
            code,
            message,
            cert_pem,
            ca_pem,
        } => {
            body.put_u8(code.to_u8());
            put_str(&mut body, message, name)?;
            put_str(&mut body, cert_pem, name)?;
            put_str(&mut body, ca_pem, name)?;
            kind::CERTIFICATE
        }
        Message::Unknown { .. } => return Err(EncodeError::Unknown),
    };
    if body.len() > MAX_FRAME_BODY {
        return Err(EncodeError::TooLarge(name));
    }
    out.reserve(FRAME_HEADER_LEN + body.len());
    out.put_u8(kind);
    out.put_u16(body.len() as u16);
    out.extend_from_slice(&body);
    Ok(())
}

/// Encodes one message into a fresh buffer.
pub fn encode_to_bytes(msg: &Message) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::new();
    encode(msg, &mut out)?;
    Ok(out.freeze())
}

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and call again), or
/// the message and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    if len > MAX_FRAME_BODY {
        return Err(DecodeError::FrameTooLarge(len));
    }
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[FRAME_HEADER_LEN..total];
    let msg = decode_body(kind, body)?;
    Ok(Some((msg, total)))
}

/// How many more bytes are needed before [`decode`] can return a frame, given what is buffered.
/// Lets readers ask for exactly one frame and never consume payload that follows it.
pub fn bytes_needed(buf: &[u8]) -> Result<usize, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(FRAME_HEADER_LEN - buf.len());
    }
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    if len > MAX_FRAME_BODY {
        return Err(DecodeError::FrameTooLarge(len));
    }
    Ok((FRAME_HEADER_LEN + len).saturating_sub(buf.len()))
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader {
        buf: body,
        msg: "unknown",
    };
    let msg = match kind {
        kind::HELLO => {
            r.msg = "hello";
            Message::Hello {
                min_version: r.u8()?,
                max_version: r.u8()?,
                node_name: r.string()?,
                capabilities: r.string_list()?,
            }
        }
        kind::WELCOME => {
            r.msg = "welcome";
            Message::Welcome {
                version: r.u8()?,
                server_id: r.string()?,
                capabilities: r.string_list()?,
            }
        }
        kind::SERVER_LIST => {
            r.msg = "server-list";
            let n = r.count()?;
            let mut servers = Vec::with_capacity(n);
            for _ in 0..n {
                servers.push(ServerInfo {
                    addr: r.string()?,
                    healthy: r.bool()?,
                    draining: r.bool()?,
                });
            }
            Message::ServerList { servers }
        }
        kind::HEALTH => {
            r.msg = "health";
            Message::Health {
                upstream_healthy: r.bool()?,
            }
        }
        kind::DRAIN => {
            r.msg = "drain";
            Message::Drain
        }
        kind::PING => {
            r.msg = "ping";
            Message::Ping { nonce: r.u64()? }
        }
        kind::PONG => {
            r.msg = "pong";
            Message::Pong { nonce: r.u64()? }
        }
        kind::CLOCK => {
            r.msg = "clock";
            Message::Clock { unix_ms: r.u64()? }
        }
        kind::RENEW_NOW => {
            r.msg = "renew-now";
            Message::RenewNow {
                issuer: r.string()?,
                trusted: r.string_list()?,
            }
        }
        kind::SERVER_DOWN => {
            r.msg = "server-down";
            Message::ServerDown {
                server_id: r.string()?,
            }
        }
        kind::NODE_INFO => {
            r.msg = "node-info";
            Message::NodeInfo {
                addresses: r.string_list()?,
            }
        }
        kind::OPEN => {
            r.msg = "open";
            let version = r.u8()?;
            let target = match r.u8()? {
                0 => Target::Service(r.string()?),
                1 => Target::Address {
                    host: r.string()?,
                    port: r.u16()?,
                },
                k => {
                    return Err(DecodeError::BadTargetKind {
                        msg: r.msg,
                        kind: k,
                    })
                }
            };
            Message::Open {
                version,
                target,
                hops: r.u8()?,
            }
        }
        kind::STATUS => {
            r.msg = "status";
            Message::Status {
                code: StatusCode::from_u8(r.u8()?),
                message: r.string()?,
            }
        }
        kind::NODE_RECORD => {
            r.msg = "node-record";
            Message::NodeRecord {
                name: r.string()?,
                state: r.record_state()?,
                at_ms: r.u64()?,
            }
        }
        kind::NODE_RECORD_V2 | kind::NODE_RECORD_V3 => {
            r.msg = "node-record-v2";
            Message::NodeRecordV2 {
                name: r.string()?,
                state: r.record_state()?,
                epoch: r.u32()?,
                version: r.u64()?,
                writer: r.string()?,
                at_ms: r.u64()?,
                previous: r.string()?,
                seen: r.bool()?,
                addresses: if kind == kind::NODE_RECORD_V3 {
                    let list = r.string_list()?;
                    if list.is_empty() {
                        return Err(DecodeError::EmptyAddresses { msg: r.msg });
                    }
                    list
                } else {
                    Vec::new()
                },
            }
        }
        kind::JOIN => {
            r.msg = "join";
            Message::Join {
                token_id: r.string()?,
                secret: r.string()?,
                node_name: r.string()?,
                csr: r.bytes()?,
            }
        }
        kind::RENEW => {
            r.msg = "renew";
            Message::Renew { csr: r.bytes()? }
        }
        kind::CERTIFICATE => {
            r.msg = "certificate";
            Message::Certificate {
                code: StatusCode::from_u8(r.u8()?),
                message: r.string()?,
                cert_pem: r.string()?,
                ca_pem: r.string()?,
            }
        }
        other => {
            return Ok(Message::Unknown {
                kind: other,
                len: body.len(),
            })
        }
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes {
            msg: r.msg,
            extra: r.buf.len(),
        });
    }
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated { msg: self.msg })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b.to_vec())
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadBool {
                msg: self.msg,
                value,
            }),
        }
    }
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_LIST_ITEMS {
            return Err(DecodeError::TooManyItems {
                msg: self.msg,
                count: n,
            });
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::BadUtf8 { msg: self.msg })
    }
    fn record_state(&mut self) -> Result<RecordState, DecodeError> {
        Ok(match self.u8()? {
            0 => RecordState::Owned(self.string()?),
            1 => RecordState::Revoked,
            2 => RecordState::Forgotten,
            k => {
                return Err(DecodeError::BadTargetKind {
                    msg: self.msg,
                    kind: k,
                })
            }
        })
    }

    fn string_list(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.string()?);
        }
        Ok(v)
    }
}

fn put_record_state(
    out: &mut BytesMut,
    state: &RecordState,
    msg: &'static str,
) -> Result<(), EncodeError> {
    match state {
        RecordState::Owned(k) => {
            out.put_u8(0);
            put_str(out, k, msg)?;
        }
        RecordState::Revoked => out.put_u8(1),
        RecordState::Forgotten => out.put_u8(2),
    }
    Ok(())
}

fn put_str(out: &mut BytesMut, s: &str, msg: &'static str) -> Result<(), EncodeError> {
    let n = u16::try_from(s.len()).map_err(|_| EncodeError::StringTooLong(msg))?;
    out.put_u16(n);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_bytes(out: &mut BytesMut, b: &[u8], msg: &'static str) -> Result<(), EncodeError> {
    let n = u16::try_from(b.len()).map_err(|_| EncodeError::StringTooLong(msg))?;
    out.put_u16(n);
    out.extend_from_slice(b);
    Ok(())
}

fn put_count(out: &mut BytesMut, n: usize, msg: &'static str) -> Result<(), EncodeError> {
    if n > MAX_LIST_ITEMS {
        return Err(EncodeError::TooManyItems(msg));
    }
    out.put_u16(n as u16);
    Ok(())
}

fn put_str_list(out: &mut BytesMut, v: &[String], msg: &'static str) -> Result<(), EncodeError> {
    put_count(out, v.len(), msg)?;
    for s in v {
        put_str(out, s, msg)?;
    }
    Ok(())
}
