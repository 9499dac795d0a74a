//! Agents behind an HTTP proxy: many edge sites reach the outside world only through one. The
//! TLS/TCP transport and the join dial the server through the proxy with `CONNECT host:port`
//! (RFC 9110, 9.3.6), with basic authentication when the proxy URL carries credentials; TLS
//! then runs end to end through the proxy's tunnel, so the proxy sees only the server's name
//! and port. QUIC is still tried directly first (`--transport auto`): a proxy carries no UDP.
//!
//! Which proxy: `--proxy URL` (`TETHER_PROXY`, settings key `proxy`), else the standard
//! `HTTPS_PROXY` (or `https_proxy`) with `NO_PROXY` (or `no_proxy`) naming the servers to reach
//! directly, as curl and Go read them.

use base64::Engine as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest the proxy's answer head may be: a proxy that sends more is refused.
pub const MAX_ANSWER_HEAD: usize = 8 * 1024;

/// Why a proxy setting or a dial through the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy URL {0:?}: use http://[user:password@]host:port")]
    BadUrl(String),
    #[error("cannot reach the proxy {proxy}: {source}")]
    Connect {
        proxy: String,
        source: std::io::Error,
    },
    #[error("the proxy {proxy} failed while answering: {source}")]
    Io {
        proxy: String,
        source: std::io::Error,
    },
    #[error("the proxy {0} sent no answer head within {MAX_ANSWER_HEAD} bytes")]
    AnswerTooLong(String),
    #[error("the proxy {0} closed the connection before answering")]
    Closed(String),
    #[error("the proxy {proxy} answered {status}: {line}")]
    Refused {
        proxy: String,
        status: u16,
        line: String,
    },
    #[error("the proxy {0} sent an answer that is not HTTP")]
    NotHttp(String),
}

/// An HTTP proxy to dial servers through (see the module's doc).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// `user:password`, for basic authentication.
    credentials: Option<String>,
    /// Hosts (and domain suffixes) reached directly (`NO_PROXY`).
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: this reaches logs.
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("auth", &self.credentials.is_some())
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl std::fmt::Display for Proxy {
    /// The proxy as `status` and logs show it: `http://[user@]host:port`, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self
            .credentials
            .as_deref()
            .and_then(|c| c.split(':').next())
        {
            Some(user) => write!(f, "http://{user}@{}", self.addr),
            None => write!(f, "http://{}", self.addr),
        }
    }
}

impl std::str::FromStr for Proxy {
    type Err = ProxyError;

    /// `http://[user:password@]host:port` (the scheme may be left out; the port defaults to
    /// 3128, squid's). Credentials may be percent-encoded.
    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = || ProxyError::BadUrl(redact(url));
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(_) => return Err(bad()),
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.is_empty() {
            return Err(bad());
        }
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => {
                let c = percent_decode(c).ok_or_else(bad)?;
                if !c.contains(':') {
                    return Err(bad());
                }
                (Some(c), h)
            }
            None => (None, rest),
        };
        let addr = if hostport.starts_with('[') {
            match hostport.rsplit_once("]:") {
                Some((_, port)) if port.parse::<u16>().is_ok() => hostport.to_string(),
                _ if hostport.ends_with(']') => format!("{hostport}:3128"),
                _ => return Err(bad()),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok() => {
                    hostport.to_string()
                }
                Some(_) => return Err(bad()),
                None => format!("{hostport}:3128"),
            }
        };
        Ok(Proxy {
            addr,
            credentials,
            no_proxy: Vec::new(),
        })
    }
}

/// `url` with any password replaced, for error messages.
fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, after)) => match before.rsplit_once(':') {
            Some((user, _)) if !user.ends_with('/') && !user.ends_with("http") => {
                format!("{user}:***@{after}")
            }
            _ => format!("{before}@{after}"),
        },
        None => url.to_string(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Proxy {
    /// The proxy to use: `explicit` (`--proxy`; empty means none), else `HTTPS_PROXY` with
    /// `NO_PROXY` from `env` (a lookup, so that tests need not touch the process's variables).
    pub fn from_settings(
        explicit: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, ProxyError> {
        let var = |upper: &str, lower: &str| {
            env(upper)
                .or_else(|| env(lower))
                .filter(|v| !v.trim().is_empty())
        };
        let url = match explicit {
            Some(u) if u.trim().is_empty() => return Ok(None),
            Some(u) => u.to_string(),
            None => match var("HTTPS_PROXY", "https_proxy") {
                Some(u) => u,
                None => return Ok(None),
            },
        };
        let mut proxy: Proxy = url.trim().parse()?;
        proxy.no_proxy = var("NO_PROXY", "no_proxy")
            .map(|v| {
                v.split(',')
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(proxy))
    }

    /// Whether a server named `host` is dialed through the proxy: not when `NO_PROXY` names it
    /// (`*` for every host; `example.com` or `.example.com` for it and its subdomains; an IP
    /// address as written).
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        !self.no_proxy.iter().any(|n| {
            let n = n.trim_start_matches('.');
            n == "*" || host == n || host.ends_with(&format!(".{n}"))
        })
    }

    /// Connects to `target` (`host:port`) through the proxy, within `timeout`: a TCP
    /// connection to the proxy, `CONNECT`, and its `200` answer; the stream then carries the
    /// tunnel's bytes to the server.
    pub async fn connect(&self, target: &str, timeout: Duration) -> Result<TcpStream, ProxyError> {
        match tokio::time::timeout(timeout, self.connect_now(target)).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Io {
                proxy: self.addr.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no tunnel through it within {timeout:?}"),
                ),
            }),
        }
    }

    async fn connect_now(&self, target: &str) -> Result<TcpStream, ProxyError> {
        let io = |source| ProxyError::Io {
            proxy: self.addr.clone(),
            source,
        };
        let mut s = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| ProxyError::Connect {
                proxy: self.addr.clone(),
                source,
            })?;
        let _ = s.set_nodelay(true);
        s.write_all(self.request(target).as_bytes())
            .await
            .map_err(io)?;
        // Read the answer head byte by byte, so that nothing after it (the server's first TLS
        // bytes, if a proxy sends them early) is taken from the stream.
        let mut head = Vec::with_capacity(256);
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_ANSWER_HEAD {
                return Err(ProxyError::AnswerTooLong(self.addr.clone()));
            }
            let mut b = [0u8; 1];
            match s.read(&mut b).await.map_err(io)? {
                0 => return Err(ProxyError::Closed(self.addr.clone())),
                _ => head.push(b[0]),
            }
        }
        let status = parse_status(&head).ok_or_else(|| ProxyError::NotHttp(self.addr.clone()))?;
        if !(200..300).contains(&status.0) {
            return Err(ProxyError::Refused {
                proxy: self.addr.clone(),
                status: status.0,
                line: status.1,
            });
        }
        Ok(s)
    }

    /// The `CONNECT` request for `target`.
    fn request(&self, target: &str) -> String {
        let auth = match &self.credentials {
            Some(c) => format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(c)
            ),
            None => String::new(),
        };
        format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}User-Agent: tether-agent\r\n\r\n"
        )
    }
}

/// The status code and the status line of an HTTP answer head.
fn parse_status(head: &[u8]) -> Option<(u16, String)> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end().to_string();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.parse().ok()?;
    Some((code, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn urls_parse_with_credentials_defaults_and_no_password_shown() {
        let p: Proxy = "http://alice:s%40cret@proxy.example:8080".parse().unwrap();
        assert_eq!(p.addr, "proxy.example:8080");
        assert_eq!(p.credentials.as_deref(), Some("alice:s@cret"));
        assert_eq!(p.to_string(), "http://alice@proxy.example:8080");
        assert!(!format!("{p:?}").contains("cret"));
        let p: Proxy = "proxy.example".parse().unwrap();
        assert_eq!(p.addr, "proxy.example:3128");
        let p: Proxy = "http://[2001:db8::1]:3128/".parse().unwrap();
        assert_eq!(p.addr, "[2001:db8::1]:3128");
        for bad in [
            "https://proxy:3128",
            "socks5://proxy:1080",
            "http://proxy:port",
            "http://proxy:3128/path",
            "http://user@proxy:3128",
            "http://",
        ] {
            assert!(bad.parse::<Proxy>().is_err(), "{bad}");
        }
        let e = "https://bob:hunter2@proxy:3128"
            .parse::<Proxy>()
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn the_flag_wins_then_https_proxy_with_no_proxy() {
        let vars = [
            ("HTTPS_PROXY", "http://envproxy:3128"),
            ("no_proxy", "cp.internal, .corp.example,10.0.0.5"),
        ];
        let p = Proxy::from_settings(Some("http://flag:1"), env(&vars))
            .unwrap()
            .unwrap();
        assert_eq!(p.addr, "flag:1");
        // An empty flag turns the environment's proxy off.
        assert_eq!(Proxy::from_settings(Some(""), env(&vars)).unwrap(), None);
        let p = Proxy::from_settings(None, env(&vars)).unwrap().unwrap();
        assert_eq!(p.addr, "envproxy:3128");
        assert!(!p.applies_to("cp.internal"));
        assert!(!p.applies_to("m1.corp.example"));
        assert!(!p.applies_to("10.0.0.5"));
        assert!(p.applies_to("cp.example"));
        assert!(p.applies_to("10.0.0.6"));
        assert_eq!(Proxy::from_settings(None, env(&[])).unwrap(), None);
        let all = [("https_proxy", "p:3128"), ("NO_PROXY", "*")];
        let p = Proxy::from_settings(None, env(&all)).unwrap().unwrap();
        assert!(!p.applies_to("anything"));
    }

    #[test]
    fn the_connect_request_carries_basic_auth() {
        let p: Proxy = "http://alice:pw@proxy:3128".parse().unwrap();
        let r = p.request("cp.example:9443");
        assert!(r.starts_with("CONNECT cp.example:9443 HTTP/1.1\r\nHost: cp.example:9443\r\n"));
        assert!(
            r.contains("Proxy-Authorization: Basic YWxpY2U6cHc=\r\n"),
            "{r}"
        );
        assert!(r.ends_with("\r\n\r\n"));
    }

    #[test]
    fn answer_heads_are_judged() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 Connection established\r\n\r\n").map(|s| s.0),
            Some(200)
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n").map(|s| s.0),
            Some(407)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
    }
}
