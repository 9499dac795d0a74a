//! What both command-line tools share beyond their flags: reading the settings file, the
//! `status` command's table, shell completions and man pages.

use crate::config_file;
use clap::CommandFactory;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tether_endpoint::status::Status;

/// Parses the command line with `run --config FILE` merged in (see [`config_file`]). A bad
/// file stops here, like a bad flag, with exit code 2 and the key and file named.
pub fn parse<C: clap::Parser>() -> C {
    let args: Vec<OsString> = std::env::args_os().collect();
    // `diagnose` reads the same settings as `run`, so the same settings file.
    let merged = config_file::merge(&C::command(), "run", args)
        .and_then(|a| config_file::merge(&C::command(), "diagnose", a));
    match merged {
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

/// Why a tool command (`status`, `man`) failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read the admin endpoint at {admin}: {source} (is the process running with `run --admin {admin}`?)")]
    Unreachable {
        admin: String,
        source: std::io::Error,
    },
    #[error("{admin}: answered {code} (an older tether without /status?)")]
    NoStatus { admin: String, code: u16 },
    #[error("{admin}: bad status JSON: {source}")]
    BadStatus {
        admin: String,
        source: serde_json::Error,
    },
    #[error("{dir}: {source}")]
    Man {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Reads `GET /status` from an admin endpoint.
pub fn fetch_status(admin: &str) -> Result<Status, CliError> {
    let (code, body) =
        tether_endpoint::http::get_blocking(admin, "/status", Duration::from_secs(10)).map_err(
            |source| CliError::Unreachable {
                admin: admin.to_string(),
                source,
            },
        )?;
    if code != 200 {
        return Err(CliError::NoStatus {
            admin: admin.to_string(),
            code,
        });
    }
    serde_json::from_slice(&body).map_err(|source| CliError::BadStatus {
        admin: admin.to_string(),
        source,
    })
}

/// Prints a status document as JSON or as tables.
pub fn print_status(v: &Status, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        ),
        Output::Table => print!("{}", render_status(v)),
    }
}

fn or_dash<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |x| x.to_string())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Seconds since the epoch as a UTC date and time.
fn when<T: Copy + Into<i64>>(t: Option<T>) -> String {
    t.map_or_else(|| "-".into(), |t| crate::units::format_unix(t.into()))
}

fn since(t: Option<u64>) -> String {
    when(t.map(|t| i64::try_from(t).unwrap_or(i64::MAX)))
}

fn bytes(n: u64) -> String {
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

fn healthy(h: Option<bool>, bad: &str) -> String {
    match h {
        Some(true) => "healthy".into(),
        Some(false) => bad.into(),
        None => "-".into(),
    }
}

/// The `status` tables of a server or an agent document.
pub fn render_status(v: &Status) -> String {
    let mut out = String::new();
    let draining = |d: bool| if d { "  DRAINING" } else { "" };
    match v {
        Status::Server(v) => {
            out.push_str(&format!(
                "tether-server {}  instance {}  listen {}  advertise {}{}\n",
                v.version,
                v.instance,
                or_dash(&v.listen),
                or_dash(&v.advertise),
                draining(v.draining)
            ));
            out.push_str(&format!(
                "upstream {}: {}   certificate expires {}\n\n",
                v.upstream.address,
                healthy(Some(v.upstream.healthy), "UNHEALTHY"),
                when(v.certificate_expiry)
            ));
            if let Some(r) = v.ca.rotation.as_ref().filter(|r| r.finished.is_none()) {
                out.push_str(&format!(
                    "CA rotation running since {}: {} node(s) on the old CA{}\n\n",
                    when(Some(r.started)),
                    v.ca.nodes_on_old_ca.len(),
                    if v.ca.issuer == r.new {
                        ""
                    } else {
                        " (this server does not hold the new CA yet: `tether-server ca rotate --from`)"
                    }
                ));
            }
            let nodes: Vec<Vec<String>> = v
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        or_dash(&n.address),
                        or_dash(&n.transport),
                        or_dash(&n.key_exchange),
                        n.tunnels.to_string(),
                        n.streams.to_string(),
                        bytes(n.bytes_from_node),
                        bytes(n.bytes_to_node),
                        since(n.connected_since),
                        when(n.certificate_expiry),
                    ]
                })
                .collect();
            out.push_str(&format!("NODES ({})\n", nodes.len()));
            out.push_str(&table(
                &[
                    "name",
                    "address",
                    "transport",
                    "key exchange",
                    "tunnels",
                    "streams",
                    "from node",
                    "to node",
                    "connected since",
                    "cert expires",
                ],
                &nodes,
            ));
            let peers: Vec<Vec<String>> = v
                .peers
                .iter()
                .map(|p| {
                    vec![
                        p.address.clone(),
                        or_dash(&p.transport),
                        or_dash(&p.key_exchange),
                        healthy(p.healthy, "unhealthy"),
                        yes_no(p.draining),
                        or_dash(&p.rtt_ms),
                    ]
                })
                .collect();
            out.push_str(&format!("\nPEERS ({})\n", peers.len()));
            out.push_str(&table(
                &[
                    "address",
                    "transport",
                    "key exchange",
                    "upstream",
                    "draining",
                    "rtt ms",
                ],
                &peers,
            ));
        }
        Status::Agent(v) => {
            out.push_str(&format!(
                "tether-agent {}  node {}  certificate expires {}{}\n",
                v.version,
                v.node,
                when(v.certificate_expiry),
                draining(v.draining)
            ));
            out.push_str(&match &v.proxy {
                Some(p) => format!("TLS over TCP and joins through the proxy {p}\n\n"),
                None => "\n".to_string(),
            });
            let servers: Vec<Vec<String>> = v
                .servers
                .iter()
                .map(|x| {
                    vec![
                        x.address.clone(),
                        or_dash(&x.transport),
                        or_dash(&x.key_exchange),
                        x.state.clone(),
                        healthy(x.healthy, "unhealthy"),
                        yes_no(x.draining),
                        x.streams.to_string(),
                        or_dash(&x.rtt_ms),
                        since(x.connected_since),
                    ]
                })
                .collect();
            out.push_str(&format!("SERVERS ({})\n", servers.len()));
            out.push_str(&table(
                &[
                    "address",
                    "transport",
                    "key exchange",
                    "state",
                    "upstream",
                    "draining",
                    "streams",
                    "rtt ms",
                    "connected since",
                ],
                &servers,
            ));
            let listeners: Vec<Vec<String>> = v
                .listeners
                .iter()
                .map(|l| vec![l.address.clone(), l.service.clone()])
                .collect();
            out.push_str("\nLISTENERS\n");
            out.push_str(&table(&["address", "service"], &listeners));
        }
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
        let t = render_status(&serde_json::from_value(server).unwrap());
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
        let t = render_status(&serde_json::from_value(agent).unwrap());
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
pub fn status(a: &StatusArgs) -> Result<(), CliError> {
    let v = fetch_status(&a.admin)?;
    print_status(&v, a.output);
    Ok(())
}

/// Runs `man`.
pub fn man<C: CommandFactory>(a: &ManArgs) -> Result<(), CliError> {
    let files = man_pages::<C>(&a.dir).map_err(|source| CliError::Man {
        dir: a.dir.clone(),
        source,
    })?;
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
pub fn run_tool<C: CommandFactory>(tool: Tools) -> Result<(), CliError> {
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
