//! What operators touch, with the real binaries: settings files written from `config example`,
//! `status` in both forms and `GET /status`, documented metric names, JSON logs, completions
//! and man pages, and the shipped deployment files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tether_endpoint::status::Status;
use tether_tests::process::{bin, free_port, run_ok, spawn, spawn_cmd};
use tether_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// Sets `key = value` in a settings file made by `config example`: replaces the line that
/// sets it, or the commented-out example of it.
fn set(text: &str, key: &str, value: &str) -> String {
    let mut done = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|l| {
            let bare = l.trim_start_matches("# ");
            if !done && (bare.starts_with(&format!("{key} = "))) {
                done = true;
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(done, "config example has no line for {key}");
    out.push(String::new());
    out.join("\n")
}

/// Metric names in the table of docs/operations.md.
fn documented_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).expect("operations.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `tether_"))
        .filter_map(|l| l.split(['`', '{']).next())
        .map(|n| format!("tether_{n}"))
        .collect()
}

fn metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// `status --output json`, read as the document the endpoint serves.
fn status_json(binary: &str, admin: &str) -> Status {
    let out = run_ok(
        &bin(binary),
        &["status", "--admin", admin, "--output", "json"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_files_status_and_metrics_work_together() {
    let tmp = TempDir::new("ops");
    let echo = start_echo();
    let sdir = tmp.path().join("server");
    let adir = tmp.path().join("agent");
    let (s, a) = (sdir.to_str().unwrap(), adir.to_str().unwrap());
    run_ok(
        &bin("tether-server"),
        &["init", "--data-dir", s, "--san", "localhost,127.0.0.1,::1"],
    );
    run_ok(
        &bin("tether-server"),
        &[
            "issue-agent",
            "--data-dir",
            s,
            "--node-name",
            "edge-1",
            "--out-dir",
            a,
        ],
    );

    // Settings files written from `config example`, as an operator would.
    let port = free_port();
    let (sadmin, aadmin, aadmin_env) = (free_port(), free_port(), free_port());
    let mut server_toml = run_ok(&bin("tether-server"), &["config", "example"]);
    server_toml = set(&server_toml, "data-dir", &format!("{s:?}"));
    server_toml = set(&server_toml, "listen", &format!("\"127.0.0.1:{port}\""));
    server_toml = set(&server_toml, "upstream", &format!("\"{}\"", echo.addr));
    server_toml = set(&server_toml, "admin", &format!("\"127.0.0.1:{sadmin}\""));
    let server_file = tmp.path().join("server.toml");
    std::fs::write(&server_file, &server_toml).unwrap();
    let mut agent_toml = run_ok(&bin("tether-agent"), &["config", "example"]);
    agent_toml = set(&agent_toml, "server", &format!("[\"127.0.0.1:{port}\"]"));
    agent_toml = set(&agent_toml, "data-dir", &format!("{a:?}"));
    agent_toml = set(&agent_toml, "listen", "\"127.0.0.1:1\"");
    agent_toml = set(&agent_toml, "admin", &format!("\"127.0.0.1:{aadmin}\""));
    // QUIC, not auto: on a busy machine auto may settle on TCP first, and status is checked
    // for the transport below.
    agent_toml = set(&agent_toml, "transport", "\"quic\"");
    let agent_file = tmp.path().join("agent.toml");
    std::fs::write(&agent_file, &agent_toml).unwrap();

    let server = spawn(
        "server",
        &bin("tether-server"),
        &["run", "--config", server_file.to_str().unwrap()],
        tmp.path().join("server.log"),
    );
    // The agent starts once the server serves, so that its first handshake is not lost.
    let server_admin = format!("127.0.0.1:{sadmin}");
    wait_for("server admin", Duration::from_secs(30), || async {
        std::net::TcpStream::connect(&server_admin).is_ok()
    })
    .await;
    // The flag beats the file's listen; the variable beats the file's admin.
    let listen = format!("127.0.0.1:{}", free_port());
    let agent = spawn_cmd(
        "agent",
        std::process::Command::new(bin("tether-agent"))
            .args(["run", "--config", agent_file.to_str().unwrap()])
            .args(["--listen", &listen])
            .env("TETHER_ADMIN", format!("127.0.0.1:{aadmin_env}")),
        tmp.path().join("agent.log"),
    );
    let aadmin = format!("127.0.0.1:{aadmin_env}");
    let sadmin = format!("127.0.0.1:{sadmin}");
    wait_for("agent ready", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(&aadmin).is_ok()
    })
    .await;
    // Generous: under a loaded CI machine the first QUIC handshake can time out and the agent
    // retries after its backoff.
    let agent_admin = aadmin.parse().unwrap();
    let ready = eventually(Duration::from_secs(60), || async {
        matches!(http_get(agent_admin, "/readyz").await, Ok((200, _)))
    })
    .await;
    assert!(ready, "agent not ready: {}", agent.log_text());
    echo_roundtrip(
        listen.parse().unwrap(),
        b"through the flag's listener".to_vec(),
    )
    .await
    .expect("echo through the agent");

    // Agent status: both forms, and the endpoint itself.
    let Status::Agent(v) = status_json("tether-agent", &aadmin) else {
        panic!("the agent's status is not an agent's");
    };
    assert_eq!(v.node, "edge-1");
    assert_eq!(v.servers[0].state, "up");
    assert_eq!(v.servers[0].transport.as_deref(), Some("quic"));
    // The post-quantum hybrid, by default, read from `status --output json`.
    assert_eq!(v.servers[0].key_exchange.as_deref(), Some("X25519MLKEM768"));
    // The server said its clock after the welcome: the same host's, so within a second.
    let skew = v.servers[0].clock_skew_ms;
    assert!(
        skew.is_some_and(|ms| ms.abs() < 1000),
        "clock skew {skew:?}"
    );
    assert_eq!(v.listeners[0].address, listen);
    let table = run_ok(&bin("tether-agent"), &["status", "--admin", &aadmin]);
    assert!(
        table.contains("SERVERS (1)") && table.contains(&format!("127.0.0.1:{port}")),
        "{table}"
    );
    let (code, body) = http_get(aadmin.parse().unwrap(), "/status").await.unwrap();
    assert_eq!(code, 200);
    assert!(serde_json::from_str::<Status>(&body).is_ok(), "{body}");

    // Server status: the node, its transport and its bytes.
    let Status::Server(v) = status_json("tether-server", &sadmin) else {
        panic!("the server's status is not a server's");
    };
    assert!(v.upstream.healthy);
    let node = &v.nodes[0];
    assert_eq!(node.name, "edge-1");
    assert_eq!(node.transport.as_deref(), Some("quic"));
    assert_eq!(node.key_exchange.as_deref(), Some("X25519MLKEM768"));
    assert!(node.bytes_from_node > 0, "{v:?}");
    let table = run_ok(&bin("tether-server"), &["status", "--admin", &sadmin]);
    assert!(
        table.contains("NODES (1)") && table.contains("edge-1"),
        "{table}"
    );

    // Every metric either binary exposes is in the documentation's table.
    let documented = documented_metrics();
    assert!(documented.len() > 30, "{documented:?}");
    for admin in [&aadmin, &sadmin] {
        let (_, text) = http_get(admin.parse().unwrap(), "/metrics").await.unwrap();
        for name in metric_names(&text) {
            assert!(
                documented.contains(&name),
                "{name} is not in docs/operations.md"
            );
        }
    }
    drop(agent);
    drop(server);
}

#[test]
fn bad_settings_files_name_the_key_and_the_file() {
    let tmp = TempDir::new("ops-bad");
    for (text, key) in [
        ("data-dir = \"/x\"\nlisen = \"127.0.0.1:1\"\n", "lisen"),
        (
            "data-dir = \"/x\"\nkeepalive-interval = \"soon\"\n",
            "keepalive-interval",
        ),
        (
            "data-dir = \"/x\"\npeer = \"a:1\"\nmax-streams = -1\n",
            "max-streams",
        ),
    ] {
        let file = tmp.path().join("server.toml");
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(bin("tether-server"))
            .args(["run", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(file.to_str().unwrap()),
            "{err}"
        );
    }
    let out = std::process::Command::new(bin("tether-agent"))
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}

#[test]
fn json_logs_completions_and_man_pages() {
    let tmp = TempDir::new("ops-misc");
    // A server that cannot start still logs in the chosen format... its error goes to stderr
    // as text from anyhow, but `init` logs nothing; use a run that logs before failing.
    let sdir = tmp.path().join("s");
    run_ok(
        &bin("tether-server"),
        &[
            "init",
            "--data-dir",
            sdir.to_str().unwrap(),
            "--san",
            "localhost,127.0.0.1,::1",
        ],
    );
    let mut child = std::process::Command::new(bin("tether-server"))
        .args([
            "--log-format",
            "json",
            "run",
            "--data-dir",
            sdir.to_str().unwrap(),
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--upstream",
            "127.0.0.1:9",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let first = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .next()
        .and_then(Result::ok)
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON: {e}: {first}"));
    assert!(v["level"].is_string() && v["message"].is_string(), "{v}");

    for b in ["tether-server", "tether-agent"] {
        let script = run_ok(&bin(b), &["completions", "bash"]);
        assert!(script.contains(b) && script.contains("complete"), "{b}");
        let dir = tmp.path().join(format!("man-{b}"));
        run_ok(&bin(b), &["man", dir.to_str().unwrap()]);
        for page in [
            format!("{b}.1"),
            format!("{b}-run.1"),
            format!("{b}-status.1"),
        ] {
            let text = std::fs::read_to_string(dir.join(&page)).unwrap_or_default();
            assert!(text.contains(".TH"), "{page} is a man page");
        }
    }
}

/// Parses YAML with python3's yaml module (Debian's python3-yaml), which CI installs.
fn yaml_documents(path: &Path) -> Option<serde_json::Value> {
    let script =
        "import json,sys,yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named") {
            return None;
        }
        panic!("{} is not valid YAML: {err}", path.display());
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn shipped_deployment_files_are_valid() {
    let root = repo();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/tether.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let documented = documented_metrics();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().unwrap_or_default().to_string());
        }
    }
    let alerts_path = root.join("deploy/prometheus/alerts.yaml");
    let Some(alerts) = yaml_documents(&alerts_path) else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("python3 with yaml is needed to check the YAML files (apt-get install python3-yaml)");
        }
        eprintln!("SKIPPED: YAML checks need python3-yaml");
        return;
    };
    let rules = alerts[0]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .clone();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "TetherNodeWithoutTunnel",
        "TetherUpstreamUnhealthy",
        "TetherFailoversRising",
        "TetherCertificateExpiringSoon",
    ] {
        assert!(names.contains(&wanted), "{wanted} in {names:?}");
    }
    exprs.extend(
        rules
            .iter()
            .filter_map(|r| r["expr"].as_str())
            .map(String::from),
    );
    // Every tether_ metric a query uses exists.
    for e in &exprs {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tether_") {
                assert!(
                    documented.contains(word),
                    "{word} (in {e}) is not a documented metric"
                );
            }
        }
    }
    for pod in ["tether-agent.yaml", "tether-server.yaml"] {
        let docs = yaml_documents(&root.join("deploy/kubernetes").join(pod)).expect("YAML");
        assert_eq!(docs[0]["kind"], "Pod", "{pod}");
        assert_eq!(docs[0]["spec"]["hostNetwork"], true, "{pod}");
        let args = docs[0]["spec"]["containers"][0]["args"].to_string();
        assert!(args.contains("--config"), "{pod}: {args}");
    }
    for unit in ["tether-agent.service", "tether-server.service"] {
        let text = std::fs::read_to_string(root.join("deploy/systemd").join(unit)).unwrap();
        for line in [
            "Type=notify",
            "Restart=",
            "NoNewPrivileges=yes",
            "ExecStart=/usr/local/bin/",
        ] {
            assert!(text.contains(line), "{unit} lacks {line}");
        }
    }
}
