//! The command-line contract, with the real binaries as processes: `init`, `issue-agent`,
//! `run` exactly as documented, flags also taken from `TETHER_*` variables, and the errors a new
//! user meets.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;
use tether_tests::process::{bin, exit, free_port, run_ok, spawn, spawn_cmd};
use tether_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_issue_agent_and_run_as_documented() {
    let tmp = TempDir::new("cli");
    let server_bin = bin("tether-server");
    let agent_bin = bin("tether-agent");
    let data = tmp.path().join("server");
    let data_s = data.to_str().unwrap();

    let out = run_ok(
        &server_bin,
        &[
            "init",
            "--data-dir",
            data_s,
            "--san",
            "cp.example.test",
            "--san",
            "localhost,127.0.0.1,::1",
        ],
    );
    assert!(out.contains("created a new CA"), "{out}");
    for f in ["ca.crt", "ca.key", "server.crt", "server.key"] {
        assert!(data.join(f).exists(), "{f} written");
    }
    let mode = std::fs::metadata(data.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A second server joins the same CA: copy ca.crt and ca.key, then init.
    let data2 = tmp.path().join("server2");
    std::fs::create_dir_all(&data2).unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(data.join(f), data2.join(f)).unwrap();
    }
    let out = run_ok(
        &server_bin,
        &[
            "init",
            "--data-dir",
            data2.to_str().unwrap(),
            "--san",
            "localhost,127.0.0.1,::1",
        ],
    );
    assert!(out.contains("kept the existing CA"), "{out}");
    assert_eq!(
        std::fs::read(data.join("ca.crt")).unwrap(),
        std::fs::read(data2.join("ca.crt")).unwrap()
    );

    let node = tmp.path().join("node");
    run_ok(
        &server_bin,
        &[
            "issue-agent",
            "--data-dir",
            data_s,
            "--node-name",
            "node-1",
            "--out-dir",
            node.to_str().unwrap(),
        ],
    );
    for f in ["ca.crt", "agent.crt", "agent.key"] {
        assert!(node.join(f).exists(), "{f} written");
    }

    let echo = start_echo();
    let (port, sadmin, aport, aadmin) = (free_port(), free_port(), free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let sadmin_s = format!("127.0.0.1:{sadmin}");
    let mut server = spawn(
        "server",
        &server_bin,
        &[
            "run",
            "--data-dir",
            data_s,
            "--listen",
            &listen,
            "--upstream",
            &echo.addr.to_string(),
            "--admin",
            &sadmin_s,
        ],
        tmp.path().join("server.log"),
    );
    // Every flag can come from a TETHER_* variable: this agent gets all of its settings that way.
    let mut cmd = Command::new(&agent_bin);
    cmd.arg("run")
        .env("TETHER_SERVER", &listen)
        .env("TETHER_DATA_DIR", &node)
        .env("TETHER_LISTEN", format!("127.0.0.1:{aport}"))
        .env("TETHER_ADMIN", format!("127.0.0.1:{aadmin}"));
    let mut agent = spawn_cmd("agent", &mut cmd, tmp.path().join("agent.log"));

    let aadmin_addr: SocketAddr = format!("127.0.0.1:{aadmin}").parse().unwrap();
    wait_ready(aadmin_addr, "agent").await;
    wait_ready(sadmin_s.parse().unwrap(), "server").await;

    let via: SocketAddr = format!("127.0.0.1:{aport}").parse().unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300u64 {
        let size = fastrand::Rng::with_seed(i).usize(..200_000);
        tasks.spawn(async move { echo_roundtrip(via, random_bytes(size, i)).await });
    }
    let results = within("300 echoes", Duration::from_secs(120), tasks.join_all()).await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );

    // The upstream goes away: local connections are closed promptly.
    echo.stop();
    wait_for("echo port closed", Duration::from_secs(5), || async {
        std::net::TcpStream::connect(echo.addr).is_err()
    })
    .await;
    if let Ok(mut c) = tokio::net::TcpStream::connect(via).await {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 8];
        let r = within("prompt close", Duration::from_secs(2), c.read(&mut b)).await;
        assert!(matches!(r, Ok(0) | Err(_)));
    }

    // SIGTERM: both exit 0.
    agent.signal("TERM");
    server.signal("TERM");
    for p in [&mut agent, &mut server] {
        let status = within("exit after SIGTERM", Duration::from_secs(10), exit(p)).await;
        assert!(
            status.success(),
            "{} exited with {status}: {}",
            p.name,
            p.log_text()
        );
    }
    let log = server.log_text();
    assert!(log.contains("tunnel up") && log.contains("node-1"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_agent_is_refused_and_logged_with_its_address() {
    let tmp = TempDir::new("cli-foreign");
    let server_bin = bin("tether-server");
    let ours = tmp.path().join("ours");
    let theirs = tmp.path().join("theirs");
    run_ok(
        &server_bin,
        &[
            "init",
            "--data-dir",
            ours.to_str().unwrap(),
            "--san",
            "localhost,127.0.0.1,::1",
        ],
    );
    run_ok(
        &server_bin,
        &[
            "init",
            "--data-dir",
            theirs.to_str().unwrap(),
            "--san",
            "localhost,127.0.0.1,::1",
        ],
    );
    let node = tmp.path().join("node");
    run_ok(
        &server_bin,
        &[
            "issue-agent",
            "--data-dir",
            theirs.to_str().unwrap(),
            "--node-name",
            "intruder",
            "--out-dir",
            node.to_str().unwrap(),
        ],
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = spawn(
        "server",
        &server_bin,
        &[
            "run",
            "--data-dir",
            ours.to_str().unwrap(),
            "--listen",
            &listen,
            "--upstream",
            "127.0.0.1:9",
        ],
        tmp.path().join("server.log"),
    );
    // The intruder trusts our CA but holds a certificate from another one.
    let aport = free_port();
    let agent = spawn(
        "agent",
        &bin("tether-agent"),
        &[
            "run",
            "--server",
            &listen,
            "--data-dir",
            node.to_str().unwrap(),
            "--ca",
            ours.join("ca.crt").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{aport}"),
        ],
        tmp.path().join("agent.log"),
    );
    wait_for("refusal logged", Duration::from_secs(15), || async {
        server.log_text().contains("refused tunnel")
    })
    .await;
    let log = server.log_text();
    let line = log.lines().find(|l| l.contains("refused tunnel")).unwrap();
    assert!(
        line.contains("127.0.0.1:"),
        "the refusal names the peer address: {line}"
    );
    assert!(!log.contains("tunnel up"), "{log}");
    drop(agent);
}

#[tokio::test]
async fn errors_a_new_user_meets_say_what_to_do() {
    let tmp = TempDir::new("cli-errors");
    let empty = tmp.path().join("empty");
    let out = std::process::Command::new(bin("tether-server"))
        .args([
            "run",
            "--data-dir",
            empty.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tether-server init"), "{err}");

    let out = std::process::Command::new(bin("tether-agent"))
        .args([
            "run",
            "--server",
            "127.0.0.1:9443",
            "--data-dir",
            empty.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("issue-agent"), "{err}");

    let out = std::process::Command::new(bin("tether-server"))
        .args([
            "issue-agent",
            "--data-dir",
            empty.to_str().unwrap(),
            "--node-name",
            "bad name",
            "--out-dir",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid node name"), "{err}");
}

/// The join token on the command line is readable by any local user through /proc. With
/// --token-file the agent joins, and its command line holds only the file's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_with_a_token_file_that_stays_off_its_command_line() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let tmp = TempDir::new("token-file");
    let token_file = pki.server_dir().join("token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let data = tmp.path().join("node");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = [
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--node-name",
        "filed",
        "--server",
        &server.local_addr.to_string(),
        "--listen",
        &listen,
    ];
    let mut agent = spawn(
        "agent",
        &bin("tether-agent"),
        &args,
        tmp.path().join("agent.log"),
    );
    wait_for("joined", Duration::from_secs(20), || async {
        data.join("agent.crt").exists()
    })
    .await;
    let pid = agent.pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(token.trim()),
        "the token is on the command line"
    );
    agent.kill();
    // A token file that cannot be read is a clear error.
    let out = std::process::Command::new(bin("tether-agent"))
        .args(["run", "--data-dir", tmp.path().join("n2").to_str().unwrap()])
        .args([
            "--token-file",
            "/nonexistent/token",
            "--server",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the token file /nonexistent/token"),
        "{err}"
    );
    server.shutdown().await;
}

/// Another process holds the agent's port: the error names it, so the operator knows what
/// to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_local_port_is_reported_with_its_holder() {
    let pki = Pki::new();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = agent_config(&pki, "edge-1", &["127.0.0.1:9".parse().unwrap()]);
    c.listen = holder.local_addr().unwrap();
    let err = tether_agent::start(c).await.err().unwrap().to_string();
    let me = std::process::id().to_string();
    assert!(
        err.contains("taken by process") && err.contains(&me),
        "{err}"
    );
}

/// Each `tether-bench` subcommand reaches its own code. A soak with a fault that does not exist
/// is refused at once by the soak's own check; for a while a dispatch bug sent every `soak`
/// to the loopback benchmark, and CI's "quick soak" measured throughput instead (minutes, and no
/// error). The child is killed at the deadline, so a regression fails here rather than hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_bench_subcommands_reach_their_own_code() {
    for (args, says) in [
        (
            &["soak", "--no-netns", "--faults", "no-such-fault"][..],
            "no fault",
        ),
        (
            &["wan", "--profiles", "no-such-profile"][..],
            "no link profile",
        ),
        (
            &["soak", "--link", "no-such-profile"][..],
            "no link profile",
        ),
        (
            &["soak", "--link", "cellular", "--scenario", "storm"][..],
            "mixed scenario only",
        ),
    ] {
        let child = tokio::process::Command::new(bin("tether-bench"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("tether-bench {args:?} still runs after 30 s"))
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "tether-bench {args:?}: {err}");
        assert!(err.contains(says), "tether-bench {args:?}: {err}");
        assert!(
            !err.contains("results in target/bench"),
            "tether-bench {args:?} ran the loopback benchmark: {err}"
        );
    }
}

/// `tether-agent diagnose` with the settings of a running agent: every check ok and exit 0 on
/// a healthy node; with its server gone, the TCP check fails (and QUIC warns, `auto` falling
/// back), and it exits 2. The same as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_passes_on_a_healthy_node_and_fails_when_its_server_is_gone() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let tmp = TempDir::new("diagnose");
    let (listen, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let data = pki.agent_dir("diag");
    let settings: Vec<String> = [
        "--data-dir",
        data.to_str().unwrap(),
        "--server",
        &server.local_addr.to_string(),
        "--listen",
        &listen,
        "--admin",
        &admin,
    ]
    .map(String::from)
    .to_vec();
    let run_args: Vec<&str> = std::iter::once("run")
        .chain(settings.iter().map(String::as_str))
        .collect();
    let _agent = spawn(
        "agent",
        &bin("tether-agent"),
        &run_args,
        tmp.path().join("agent.log"),
    );
    wait_ready(admin.parse().unwrap(), "agent").await;
    let diagnose = |json: bool| {
        let mut cmd = Command::new(bin("tether-agent"));
        cmd.arg("diagnose").args(&settings);
        if json {
            cmd.args(["--output", "json"]);
        }
        cmd.output().unwrap()
    };
    let out = diagnose(false);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    for check in [
        "certificate",
        "dns ",
        "quic ",
        "tcp ",
        "tls ",
        "clock ",
        "proxy",
        "listener ",
        "admin ",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "no ok line for {check}: {text}"
        );
    }
    assert!(text.contains("held by the running tether-agent"), "{text}");
    assert!(text.contains("X25519MLKEM768"), "{text}");

    // The server gone: nothing to connect to.
    server.shutdown().await;
    let out = diagnose(true);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["result"], "fail");
    let result = |prefix: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"].as_str().unwrap_or("").starts_with(prefix))
            .map(|c| c["result"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(result("tcp ").as_deref(), Some("fail"), "{text}");
    assert_eq!(result("quic ").as_deref(), Some("warn"), "{text}");
    assert_eq!(result("certificate").as_deref(), Some("ok"), "{text}");
}

/// `tether-server diagnose` with the settings of a running server that has a peer: every check
/// ok and exit 0; with its upstream gone, the upstream check fails and it exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_diagnose_passes_on_a_healthy_master_and_fails_without_its_upstream() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let peer = start_server(&pki, echo.addr).await;
    let tmp = TempDir::new("server-diagnose");
    let (listen, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let settings: Vec<String> = [
        "--data-dir",
        pki.server_dir().to_str().unwrap(),
        "--listen",
        &listen,
        "--upstream",
        &echo.addr.to_string(),
        "--admin",
        &admin,
        "--peer",
        &peer.local_addr.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let run_args: Vec<&str> = std::iter::once("run")
        .chain(settings.iter().map(String::as_str))
        .collect();
    let _server = spawn(
        "server",
        &bin("tether-server"),
        &run_args,
        tmp.path().join("server.log"),
    );
    wait_ready(admin.parse().unwrap(), "server").await;
    let diagnose = || {
        Command::new(bin("tether-server"))
            .arg("diagnose")
            .args(&settings)
            .output()
            .unwrap()
    };
    let out = diagnose();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    for check in [
        "certificates",
        "datastore",
        "ca rotation",
        "upstream",
        "listener ",
        "peer ",
        "egress",
        "admin ",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "no ok line for {check}: {text}"
        );
    }
    assert!(text.contains("held by the running tether-server"), "{text}");

    echo.stop();
    let out = diagnose();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("fail") && l.contains("upstream")),
        "{text}"
    );
    peer.shutdown().await;
}
