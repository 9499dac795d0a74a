//! Starting what each path needs in the lab: the PKI, tether's servers and agent, sshd.

use super::*;

/// The run's certificates: the servers' names include the masters' lab address.
pub(super) fn pki(work: &Path) -> Result<Pki> {
    let _ = std::fs::remove_dir_all(work.join("pki-server"));
    let _ = std::fs::remove_dir_all(work.join("pki-agent"));
    Pki::create_for(work, &MASTERS_IP.to_string(), "wan-node")
}

/// A fresh private copy of a data directory.
pub(super) fn fresh_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    crate::path::copy_dir(from, to)
}

/// Starts `bin args` inside namespace `ns`.
pub(super) fn spawn_in(
    ns: &str,
    name: &str,
    bin: &Path,
    args: &[String],
    log: &Path,
) -> Result<Proc> {
    let mut all: Vec<String> = vec!["netns".into(), "exec".into(), ns.into()];
    all.push(bin.to_string_lossy().into_owned());
    all.extend_from_slice(args);
    Ok(Proc::spawn(name, Path::new("ip"), &all, log)?)
}

/// `servers` tether-servers in the masters and an agent in the node with tunnels to all.
pub(super) fn start_tether(
    lab: &Lab,
    work: &Path,
    pki: &Pki,
    transport: &str,
    servers: usize,
    a: &WanArgs,
) -> Result<Vec<Proc>> {
    let mut procs = Vec::new();
    let mut dial = Vec::new();
    for (i, port) in SERVER_PORTS.iter().take(servers).enumerate() {
        let name = format!("server-{transport}-{i}");
        let dir = work.join(&name);
        fresh_copy(&pki.server_dir, &dir)?;
        let admin = SocketAddr::from(([127, 0, 0, 1], SERVER_ADMIN + i as u16));
        let listen = SocketAddr::from((MASTERS_IP, *port));
        let upstream = (
            SocketAddr::from(([127, 0, 0, 1], ECHO_PORT)),
            SocketAddr::from(([127, 0, 0, 1], SINK_PORT)),
        );
        let mut args = crate::path::server_args(&dir, listen, upstream, admin);
        // Peered, as masters are: a server that dies is reported to the agent by the others.
        for (j, other) in SERVER_PORTS.iter().take(servers).enumerate() {
            if j != i {
                args.push("--peer".into());
                args.push(SocketAddr::from((MASTERS_IP, *other)).to_string());
            }
        }
        args.extend(a.server_arg.iter().cloned());
        let log = work.join(format!("{name}.log"));
        let mut proc = spawn_in(&lab.masters, &name, &sibling("tether-server")?, &args, &log)?;
        wait_until(&format!("{name} ready"), Duration::from_secs(20), || {
            proc.check_alive().is_ok()
                && in_ns(&lab.masters, || http_get(admin, "/readyz").is_ok()).unwrap_or(false)
        })
        .with_context(|| format!("{name} did not start; see {}", log.display()))?;
        procs.push(proc);
        dial.push(listen.to_string());
    }
    let name = format!("agent-{transport}");
    let dir = work.join(&name);
    fresh_copy(&pki.agent_dir, &dir)?;
    let admin = SocketAddr::from(([127, 0, 0, 1], AGENT_ADMIN));
    let ends = (
        SocketAddr::from(([127, 0, 0, 1], AGENT_API)),
        SocketAddr::from(([127, 0, 0, 1], AGENT_BULK)),
    );
    let mut args = crate::path::agent_args(&dir, ends, admin, transport, &dial);
    args.extend(a.agent_arg.iter().cloned());
    let log = work.join(format!("{name}.log"));
    let mut proc = spawn_in(&lab.node, &name, &sibling("tether-agent")?, &args, &log)?;
    let want = servers as f64;
    wait_until(
        &format!("{name} tunnels up"),
        Duration::from_secs(30),
        || {
            proc.check_alive().is_ok()
                && in_ns(&lab.node, || {
                    http_get(admin, "/metrics")
                        .ok()
                        .and_then(|m| metric(&m, "tether_tunnels_up "))
                        .is_some_and(|up| up >= want)
                })
                .unwrap_or(false)
        },
    )
    .with_context(|| format!("{name} did not connect; see {}", log.display()))?;
    procs.push(proc);
    Ok(procs)
}

/// sshd in the masters and `ssh -N -L` in the node, one connection carrying both forwards.
pub(super) fn start_ssh(lab: &Lab, work: &Path) -> Result<Vec<Proc>> {
    let w = work.join("ssh");
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w)?;
    std::fs::create_dir_all("/run/sshd")?;
    for key in ["hostkey", "id"] {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(w.join(key))
            .output()
            .context("ssh-keygen (install openssh-client)")?;
        if !out.status.success() {
            bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    std::fs::copy(w.join("id.pub"), w.join("authorized_keys"))?;
    let d = w.display();
    std::fs::write(
        w.join("sshd_config"),
        format!(
            "ListenAddress {MASTERS_IP}\nPort {SSH_PORT}\nHostKey {d}/hostkey\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\nX11Forwarding no\nPrintMotd no\nCompression no\n\
             Ciphers aes128-gcm@openssh.com\nLogLevel ERROR\n"
        ),
    )?;
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        bail!("no /usr/sbin/sshd (install openssh-server)");
    }
    let mut procs = vec![spawn_in(
        &lab.masters,
        "sshd",
        sshd,
        &["-D", "-e", "-f"]
            .map(String::from)
            .into_iter()
            .chain([w.join("sshd_config").to_string_lossy().into_owned()])
            .collect::<Vec<_>>(),
        &w.join("sshd.log"),
    )?];
    let ssh_args: Vec<String> = [
        "-N",
        "-T",
        "-q",
        "-F",
        "/dev/null",
        "-i",
        &w.join("id").to_string_lossy(),
        "-p",
        &SSH_PORT.to_string(),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "Ciphers=aes128-gcm@openssh.com",
        "-o",
        "Compression=no",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        &format!("127.0.0.1:{SSH_ECHO}:127.0.0.1:{ECHO_PORT}"),
        "-L",
        &format!("127.0.0.1:{SSH_SINK}:127.0.0.1:{SINK_PORT}"),
        &format!("root@{MASTERS_IP}"),
    ]
    .map(String::from)
    .to_vec();
    let echo = SocketAddr::from(([127, 0, 0, 1], SSH_ECHO));
    // sshd may take a moment to listen: retry the client until its forward answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = spawn_in(
            &lab.node,
            "ssh",
            Path::new("/usr/bin/ssh"),
            &ssh_args,
            &w.join("ssh.log"),
        )?;
        let up = wait_until("ssh -L", Duration::from_secs(10), || {
            client.check_alive().is_ok()
                && in_ns(&lab.node, || {
                    load::probe(echo, Duration::from_secs(3)).is_ok()
                })
                .unwrap_or(false)
        });
        if up.is_ok() {
            procs.push(client);
            return Ok(procs);
        }
        if Instant::now() > deadline {
            bail!("ssh -L did not come up; see {}", w.display());
        }
    }
}
