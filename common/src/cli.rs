//! What both command-line tools share beyond their flags: reading the settings file, the
//! `status` command's table, shell completions and man pages.

use crate::config_file;
use clap::CommandFactory;
use serde_json::Value;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parses the command line with `run --config FILE` merged in (see [`config_file`]). A bad
/// file stops here, like a bad flag, with exit code 2 and the key and file named.
pub fn parse<C: clap::Parser>() -> C {
    let args: Vec<OsString> = std::env::args_os().collect();
    match config_file::merge(&C::command(), "run", args) {
        Ok(args) => C::parse_from(args),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// Writes the completion script for `shell` to stdout.
pub fn completions<C: CommandFactory>(shell: clap_complete::Shell) {
    let mut cmd = C::command();
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// Writes `NAME.1` and one `NAME-SUBCOMMAND.1` per subcommand into `dir`; returns the files.
pub fn man_pages<C: CommandFactory>(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let cmd = C::command();
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    let mut write = |file: String, cmd: clap::Command| -> std::io::Result<()> {
        let path = dir.join(file);
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        std::fs::write(&path, out)?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands() {
        let full = format!("{name}-{}", sub.get_name());
        write(format!("{full}.1"), sub.clone().name(full))?;
    }
    write(format!("{name}.1"), cmd)?;
    Ok(written)
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Reads `GET /status` from an admin endpoint.
pub fn fetch_status(admin: &str) -> Result<Value, String> {
    use std::net::ToSocketAddrs;
    let addr = admin
        .to_socket_addrs()
        .map_err(|e| format!("{admin}: {e}"))?
        .next()
        .ok_or_else(|| format!("{admin}: no address"))?;
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
        format!(
            "cannot reach the admin endpoint at {admin}: {e} (is the process running with `run --admin {admin}`?)"
        )
    })?;
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        c,
        "GET /status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{admin}: {e}"))?;
    let mut text = String::new();
    c.read_to_string(&mut text)
        .map_err(|e| format!("{admin}: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{admin}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let line = head.lines().next().unwrap_or("");
        return Err(format!(
            "{admin}: {line} (an older tether without /status?)"
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("{admin}: bad status JSON: {e}"))
}

/// Prints a status document as JSON or as tables.
pub fn print_status(v: &Value, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        ),
        Output::Table => print!("{}", render_status(v)),
    }
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        Some(x) => x.to_string(),
    }
}

/// Seconds since the epoch as a UTC date and time.
fn when(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_i64) {
        Some(t) => match time::OffsetDateTime::from_unix_timestamp(t) {
            Ok(d) => format!(
                "{:04}-{:02}-{:02} {:02}:{:02}Z",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute()
            ),
            Err(_) => t.to_string(),
        },
        None => "-".into(),
    }
}

fn bytes(v: &Value, key: &str) -> String {
    let Some(n) = v.get(key).and_then(Value::as_u64) else {
        return "-".into();
    };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            out.push_str(c);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.iter().map(|h| h.to_uppercase()).collect());
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn list<'a>(v: &'a Value, key: &str) -> Vec<&'a Value> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// The `status` tables of a server or an agent document.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    match v.get("kind").and_then(Value::as_str) {
        Some("server") => {
            let up = v.get("upstream").cloned().unwrap_or(Value::Null);
            out.push_str(&format!(
                "tether-server {}  instance {}  listen {}  advertise {}{}\n",
                s(v, "version"),
                s(v, "instance"),
                s(v, "listen"),
                s(v, "advertise"),
                if v.get("draining").and_then(Value::as_bool) == Some(true) {
                    "  DRAINING"
                } else {
                    ""
                }
            ));
            out.push_str(&format!(
                "upstream {}: {}   certificate expires {}\n\n",
                s(&up, "address"),
                if up.get("healthy").and_then(Value::as_bool) == Some(true) {
                    "healthy"
                } else {
                    "UNHEALTHY"
                },
                when(v, "certificate_expiry")
            ));
            let nodes: Vec<Vec<String>> = list(v, "nodes")
                .into_iter()
                .map(|n| {
                    vec![
                        s(n, "name"),
                        s(n, "address"),
                        s(n, "transport"),
                        s(n, "tunnels"),
                        s(n, "streams"),
                        bytes(n, "bytes_from_node"),
                        bytes(n, "bytes_to_node"),
                        when(n, "connected_since"),
                        when(n, "certificate_expiry"),
                    ]
                })
                .collect();
            out.push_str(&format!("NODES ({})\n", nodes.len()));
            out.push_str(&table(
                &[
                    "name",
                    "address",
                    "transport",
                    "tunnels",
                    "streams",
                    "from node",
                    "to node",
                    "connected since",
                    "cert expires",
                ],
                &nodes,
            ));
            let peers: Vec<Vec<String>> = list(v, "peers")
                .into_iter()
                .map(|p| {
                    vec![
                        s(p, "address"),
                        s(p, "transport"),
                        if p.get("healthy").and_then(Value::as_bool) == Some(true) {
                            "healthy".into()
                        } else {
                            "unhealthy".into()
                        },
                        s(p, "draining"),
                        s(p, "rtt_ms"),
                    ]
                })
                .collect();
            out.push_str(&format!("\nPEERS ({})\n", peers.len()));
            out.push_str(&table(
                &["address", "transport", "upstream", "draining", "rtt ms"],
                &peers,
            ));
        }
        Some("agent") => {
            out.push_str(&format!(
                "tether-agent {}  node {}  certificate expires {}{}\n\n",
                s(v, "version"),
                s(v, "node"),
                when(v, "certificate_expiry"),
                if v.get("draining").and_then(Value::as_bool) == Some(true) {
                    "  DRAINING"
                } else {
                    ""
                }
            ));
            let servers: Vec<Vec<String>> = list(v, "servers")
                .into_iter()
                .map(|x| {
                    vec![
                        s(x, "address"),
                        s(x, "transport"),
                        s(x, "state"),
                        match x.get("healthy").and_then(Value::as_bool) {
                            Some(true) => "healthy".into(),
                            Some(false) => "unhealthy".into(),
                            None => "-".into(),
                        },
                        s(x, "draining"),
                        s(x, "streams"),
                        s(x, "rtt_ms"),
                        when(x, "connected_since"),
                    ]
                })
                .collect();
            out.push_str(&format!("SERVERS ({})\n", servers.len()));
            out.push_str(&table(
                &[
                    "address",
                    "transport",
                    "state",
                    "upstream",
                    "draining",
                    "streams",
                    "rtt ms",
                    "connected since",
                ],
                &servers,
            ));
            let listeners: Vec<Vec<String>> = list(v, "listeners")
                .into_iter()
                .map(|l| vec![s(l, "address"), s(l, "service")])
                .collect();
            out.push_str("\nLISTENERS\n");
            out.push_str(&table(&["address", "service"], &listeners));
        }
        _ => out.push_str(&format!("{v}\n")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_what_matters() {
        let server = serde_json::json!({
            "kind": "server", "version": "0.1.0", "instance": "ab", "listen": "0.0.0.0:9443",
            "advertise": "10.0.0.1:9443", "draining": false,
            "upstream": {"address": "127.0.0.1:6443", "healthy": true},
            "certificate_expiry": 1_900_000_000i64,
            "nodes": [{"name": "node-a", "address": "192.0.2.7:40000", "transport": "quic",
                       "tunnels": 1, "streams": 3, "bytes_from_node": 2048, "bytes_to_node": 10,
                       "connected_since": 1_800_000_000i64, "certificate_expiry": 1_900_000_000i64}],
            "peers": [{"address": "10.0.0.2:9443", "transport": "quic", "healthy": false,
                       "draining": false, "rtt_ms": 0.4}]
        });
        let t = render_status(&server);
        assert!(
            t.contains("node-a") && t.contains("2.0 KiB") && t.contains("unhealthy"),
            "{t}"
        );
        assert!(t.contains("NODES (1)") && t.contains("PEERS (1)"));
        let agent = serde_json::json!({
            "kind": "agent", "version": "0.1.0", "node": "node-a",
            "servers": [{"address": "10.0.0.1:9443", "transport": "tcp", "state": "up",
                         "healthy": true, "draining": false, "streams": 0, "rtt_ms": 1.5}],
            "listeners": [{"address": "127.0.0.1:6443", "service": "apiserver"}]
        });
        let t = render_status(&agent);
        assert!(
            t.contains("tcp") && t.contains("apiserver") && t.contains("SERVERS (1)"),
            "{t}"
        );
    }
}

/// `status`: what a running process's admin endpoint reports.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The admin endpoint of the process, as given to `run --admin`.
    #[arg(long, env = "TETHER_ADMIN")]
    pub admin: String,
    /// table for people, json for scripts.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
}

/// `config ...`
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print a settings file with every setting of `run`, its help, and its default.
    Example,
}

/// What `completions` and `man` take.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing).
    pub dir: PathBuf,
}

/// Runs `status`; an unreachable endpoint is an error that says what to check.
pub fn status(a: &StatusArgs) -> Result<(), String> {
    let v = fetch_status(&a.admin)?;
    print_status(&v, a.output);
    Ok(())
}

/// Runs `man`.
pub fn man<C: CommandFactory>(a: &ManArgs) -> Result<(), String> {
    let files = man_pages::<C>(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// The commands both binaries have besides their own: `status`, `config`, `completions`, `man`.
#[derive(Debug, clap::Subcommand)]
pub enum Tools {
    /// Show what a running process reports: its tunnels, their state and health.
    Status(StatusArgs),
    /// Settings files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Write man pages into a directory.
    Man(ManArgs),
}

/// Runs one of [`Tools`] for the binary whose command line is `C`.
pub fn run_tool<C: CommandFactory>(tool: Tools) -> Result<(), String> {
    match tool {
        Tools::Status(a) => status(&a),
        Tools::Config(ConfigCommand::Example) => {
            print!("{}", config_file::example(&C::command(), "run"));
            Ok(())
        }
        Tools::Completions(a) => {
            completions::<C>(a.shell);
            Ok(())
        }
        Tools::Man(a) => man::<C>(&a),
    }
}

/// Seconds since the Unix epoch, as `status` documents carry times.
pub fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
