//! The WAN lab's hosts and wire: two network namespaces, `node` and `masters`, each with a TUN
//! device, and this process between the two devices moving every packet through the link model
//! of [`super::shape`]. The kernel has no `netem` here, and a user-space wire needs none: it
//! delays, paces, drops and rebinds exactly as told, and it counts every byte that crosses.
//!
//! Addresses come from 198.18.0.0/15 (set aside for benchmarks, RFC 2544) and exist only in the
//! lab's namespaces: the node is 198.18.200.1, the masters 198.18.200.2, on a point-to-point
//! link. The namespaces and devices go when the lab is dropped; a run that died leaves its
//! namespaces, which the next run removes.
//!
//! The TUN devices are created here, in the root namespace, and then moved into theirs: a TUN
//! file descriptor stays attached to its device wherever the device goes.

use super::nat;
use super::shape::{Blackouts, Direction, Fate, Shape};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tun::Tun;

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
pub const MASTERS_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
const PREFIX: &str = "tw";
/// Largest packet the wire carries: the devices' MTU, so nothing bigger is ever read.
const MTU: usize = 1500;
/// Packets the wire holds between the model and the far device, at most, per direction: past
/// the link's own queue bound this only matters for an unlimited-rate profile.
const WIRE_PACKETS: usize = 32 * 1024;

/// Bytes and packets that crossed, and what was dropped, per direction.
#[derive(Debug, Default)]
pub struct Counters {
    pub up_bytes: AtomicU64,
    pub down_bytes: AtomicU64,
    pub up_packets: AtomicU64,
    pub down_packets: AtomicU64,
    pub dropped: AtomicU64,
}

impl Counters {
    /// Bytes offered to the wire in both directions (lost ones included: the sender paid).
    pub fn bytes(&self) -> u64 {
        self.up_bytes.load(Ordering::Relaxed) + self.down_bytes.load(Ordering::Relaxed)
    }
}

/// What the run changes on a live link: blackouts, and the NAT's mapping.
struct Control {
    epoch: Instant,
    blackouts: Mutex<Blackouts>,
    nat_key: AtomicU16,
    counters: Counters,
}

impl Control {
    fn dark(&self, now: Duration) -> bool {
        self.blackouts.lock().map(|b| b.dark(now)).unwrap_or(false)
    }
}

/// A running lab. Dropping it stops the wire and removes the namespaces.
pub struct Lab {
    pub node: String,
    pub masters: String,
    control: Arc<Control>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Lab {
    /// Builds the namespaces and the wire with `up` (node to masters) and `down` shapes and a
    /// blackout schedule; `nat`: the node's UDP goes through a rebinding NAT.
    pub fn start(
        up: Shape,
        down: Shape,
        blackouts: Blackouts,
        nat: bool,
        seed: u64,
    ) -> Result<Lab> {
        remove_stale();
        let id = std::process::id();
        let node = format!("{PREFIX}-{id}-node");
        let masters = format!("{PREFIX}-{id}-masters");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wan-wire")
            .enable_all()
            .build()
            .context("the wire's runtime")?;
        let control = Arc::new(Control {
            epoch: Instant::now(),
            blackouts: Mutex::new(blackouts),
            nat_key: AtomicU16::new(if nat { 0x2a5c } else { 0 }),
            counters: Counters::default(),
        });
        let mut lab = Lab {
            node,
            masters,
            control,
            runtime: None,
        };
        for ns in [&lab.node, &lab.masters] {
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"))?;
        }
        let dev_node = format!("{PREFIX}{id}n");
        let dev_masters = format!("{PREFIX}{id}m");
        let (tun_node, tun_masters) = runtime.block_on(async {
            let make = |name: &str| -> Result<Tun> {
                Tun::builder()
                    .name(name)
                    .mtu(MTU as i32)
                    .build()
                    .with_context(|| {
                        format!("create the TUN device {name} (needs root and /dev/net/tun)")
                    })?
                    .pop()
                    .context("no TUN queue")
            };
            Ok::<_, anyhow::Error>((make(&dev_node)?, make(&dev_masters)?))
        })?;
        for (dev, ns, me, peer) in [
            (&dev_node, &lab.node, NODE_IP, MASTERS_IP),
            (&dev_masters, &lab.masters, MASTERS_IP, NODE_IP),
        ] {
            sh(&format!(
                "ip link set {dev} netns {ns} && ip -n {ns} link set {dev} up && \
                 ip -n {ns} addr add {me}/32 peer {peer}/32 dev {dev}"
            ))?;
        }
        let tun_node = Arc::new(tun_node);
        let tun_masters = Arc::new(tun_masters);
        let _guard = runtime.enter();
        tokio::spawn(wire(
            tun_node.clone(),
            tun_masters.clone(),
            Direction::new(up, seed),
            lab.control.clone(),
            true,
        ));
        tokio::spawn(wire(
            tun_masters,
            tun_node,
            Direction::new(down, seed.wrapping_add(1)),
            lab.control.clone(),
            false,
        ));
        drop(_guard);
        lab.runtime = Some(runtime);
        Ok(lab)
    }

    pub fn counters(&self) -> &Counters {
        &self.control.counters
    }

    /// Darkens the link for `len` from now.
    pub fn blackout(&self, len: Duration) {
        self.handle().blackout(len);
    }

    /// What another thread needs to change the live link.
    pub fn handle(&self) -> Handle {
        Handle(self.control.clone())
    }
}

/// Changes a live link from anywhere: blackouts and NAT rebindings.
#[derive(Clone)]
pub struct Handle(Arc<Control>);

impl Handle {
    /// Darkens the link for `len` from now.
    pub fn blackout(&self, len: Duration) {
        let now = self.0.epoch.elapsed();
        if let Ok(mut b) = self.0.blackouts.lock() {
            b.add(now, len);
        }
    }

    /// A new NAT mapping for every UDP flow of the node (no effect without the NAT).
    pub fn rebind(&self) {
        let _ = self
            .0
            .nat_key
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| {
                (k != 0).then(|| k.wrapping_mul(31).wrapping_add(0x1001).max(1))
            });
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        for ns in [&self.node, &self.masters] {
            let _ = sh(&format!("ip netns del {ns}"));
        }
    }
}

/// Moves packets from `from` to `to` through the link model, forever.
async fn wire(from: Arc<Tun>, to: Arc<Tun>, mut dir: Direction, ctl: Arc<Control>, up: bool) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Duration, Vec<u8>)>(WIRE_PACKETS);
    let epoch = tokio::time::Instant::from_std(ctl.epoch);
    let sender = tokio::spawn(async move {
        while let Some((at, packet)) = rx.recv().await {
            tokio::time::sleep_until(epoch + at).await;
            let _ = to.send(&packet).await;
        }
    });
    let mut buf = vec![0u8; MTU + 64];
    loop {
        let n = match from.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => break,
        };
        let now = ctl.epoch.elapsed();
        let c = &ctl.counters;
        let (bytes, packets) = if up {
            (&c.up_bytes, &c.up_packets)
        } else {
            (&c.down_bytes, &c.down_packets)
        };
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        packets.fetch_add(1, Ordering::Relaxed);
        match dir.offer(n, now, ctl.dark(now)) {
            Fate::Deliver(at) => {
                let mut packet = buf[..n].to_vec();
                let key = ctl.nat_key.load(Ordering::Relaxed);
                if up {
                    nat::outbound(&mut packet, key);
                } else {
                    nat::inbound(&mut packet, key);
                }
                if tx.try_send((at, packet)).is_err() {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Fate::Dark | Fate::Lost | Fate::QueueFull => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    sender.abort();
}

/// Runs `f` on a thread of its own inside namespace `ns`: sockets it makes (and threads it
/// starts) live there.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {ns} panicked"))?
    })
}

/// Moves the calling thread into namespace `ns`, for good: what it opens from now on lives
/// there. For a thread of its own that serves in a namespace (the soak's upstreams).
pub fn enter(ns: &str) -> Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter {ns}"))
}

/// Whether the lab can run here: root, `ip`, and TUN devices.
pub fn missing_requirement() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("the WAN lab needs root (network namespaces and TUN devices)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    if sh("command -v ip").is_err() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    None
}

/// Removes namespaces of lab runs whose process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&format!("ip netns del {name}"));
        }
    }
}

pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .with_context(|| format!("run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
