//! The load: short, bulk, long-lived and reverse connections, each checked end to end.

use super::*;

pub(super) struct Run {
    pub(super) lab: Lab,
    pub(super) record: Mutex<Record>,
    pub(super) t0: Instant,
    pub(super) stop: AtomicBool,
    pub(super) settings: Settings,
    /// Agents being restarted (connections to them are explained).
    pub(super) bytes: AtomicU64,
}

impl Run {
    pub(super) fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub(super) fn outcome(&self, o: Outcome) {
        self.bytes.fetch_add(o.bytes, Ordering::Relaxed);
        lock(&self.record).outcomes.push(o);
    }
}

pub(super) fn sha(data: &[u8]) -> Vec<u8> {
    let mut d = Digest::new(&SHA256);
    d.update(data);
    d.finish().as_ref().to_vec()
}

/// A connection to `addr` on `side`.
pub(super) fn connect(side: &Side, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let c = side.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    c.set_write_timeout(Some(Duration::from_secs(15)))?;
    Ok(c)
}

/// Sends `data` on one thread while reading the echo on this one, then half-closes and reads
/// to the end: the bytes back, or why not.
pub(super) fn exchange(
    side: &Side,
    addr: SocketAddr,
    data: Arc<Vec<u8>>,
) -> std::result::Result<Vec<u8>, String> {
    let c = connect(side, addr).map_err(|e| format!("connect: {e}"))?;
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for chunk in sent.chunks(64 * 1024) {
            w.write_all(chunk)?;
        }
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(data.len());
    let mut r = c;
    let read = r.read_to_end(&mut back);
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
    read.map_err(|e| format!("read: {e}"))?;
    wrote.map_err(|e| format!("write: {e}"))?;
    Ok(back)
}

pub(super) fn pick_agent(run: &Run, rng: &mut Rng) -> (usize, SocketAddr) {
    let j = rng.below(run.lab.agents.len() as u64) as usize;
    (j, lock(&run.lab.agents[j]).api)
}

/// Short request-response connections at a steady rate, spread over a few threads.
pub(super) fn short_load(run: Arc<Run>, worker: u64, workers: u64) {
    let mut rng = Rng::new(run.settings.seed ^ (0x5157 + worker));
    let gap = Duration::from_secs_f64(workers as f64 / f64::from(run.settings.rr_rate.max(1)));
    while !run.stopped() {
        let next = Instant::now() + gap;
        let (agent, addr) = pick_agent(&run, &mut rng);
        let mut data = vec![0u8; 1 + rng.below(32 * 1024) as usize];
        rng.fill(&mut data);
        let start = run.now();
        let data = Arc::new(data);
        let got = exchange(&run.lab.node, addr, data.clone());
        run.outcome(judge("short", start, run.now(), agent, &data, got));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

pub(super) fn judge(
    kind: &'static str,
    start: f64,
    end: f64,
    agent: usize,
    sent: &[u8],
    got: std::result::Result<Vec<u8>, String>,
) -> Outcome {
    let (failure, corrupt, bytes) = match got {
        Ok(back) if back.len() == sent.len() && sha(&back) == sha(sent) => {
            (None, false, sent.len() as u64)
        }
        Ok(back) if back.len() < sent.len() && sent.starts_with(&back) => (
            Some(format!(
                "ended after {} of {} bytes",
                back.len(),
                sent.len()
            )),
            false,
            back.len() as u64,
        ),
        Ok(back) => (
            Some(format!(
                "{} bytes back for {} sent, not the same",
                back.len(),
                sent.len()
            )),
            true,
            0,
        ),
        Err(e) => (Some(e), false, 0),
    };
    Outcome {
        kind,
        start,
        end,
        bytes,
        failure,
        corrupt,
        agent,
    }
}

/// Bulk connections of random sizes, checked end to end.
pub(super) fn bulk_load(run: Arc<Run>, worker: u64) {
    let mut rng = Rng::new(run.settings.seed ^ (0xB01C + worker));
    while !run.stopped() {
        let (agent, addr) = pick_agent(&run, &mut rng);
        let len = 1 + rng.below(run.settings.bulk_max) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        let start = run.now();
        let data = Arc::new(data);
        let got = exchange(&run.lab.node, addr, data.clone());
        let o = judge("bulk", start, run.now(), agent, &data, got);
        let failed = o.failure.is_some();
        run.outcome(o);
        if failed {
            // A client retries, but not in a tight loop.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Long-lived connections with a checked trickle: 64 bytes every half second, each echoed.
pub(super) fn long_load(run: Arc<Run>, worker: u64) {
    let mut rng = Rng::new(run.settings.seed ^ (0x1096 + worker));
    let (lo, hi) = run.settings.long_life;
    while !run.stopped() {
        let (agent, addr) = pick_agent(&run, &mut rng);
        let life = lo + Duration::from_millis(rng.below((hi - lo).as_millis() as u64 + 1));
        let start = run.now();
        let result = trickle(&run, addr, life, &mut rng);
        let (bytes, failure, corrupt) = match result {
            Ok(b) => (b, None, false),
            Err((b, why, corrupt)) => (b, Some(why), corrupt),
        };
        let failed = failure.is_some();
        run.outcome(Outcome {
            kind: "long",
            start,
            end: run.now(),
            bytes,
            failure,
            corrupt,
            agent,
        });
        if failed {
            // A watch is re-established, but not in a tight loop.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

pub(super) type TrickleError = (u64, String, bool);

pub(super) fn trickle(
    run: &Run,
    addr: SocketAddr,
    life: Duration,
    rng: &mut Rng,
) -> std::result::Result<u64, TrickleError> {
    let mut c = connect(&run.lab.node, addr).map_err(|e| (0, format!("connect: {e}"), false))?;
    // Silent longer than this is stuck: failures are noticed in ~2.5 s, and a reset travels.
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| (0, e.to_string(), false))?;
    let end = Instant::now() + life;
    let mut bytes = 0u64;
    let mut msg = [0u8; 64];
    let mut back = [0u8; 64];
    while Instant::now() < end && !run.stopped() {
        rng.fill(&mut msg);
        c.write_all(&msg)
            .map_err(|e| (bytes, format!("write: {e}"), false))?;
        match c.read_exact(&mut back) {
            Ok(()) if back == msg => bytes += 64,
            Ok(()) => return Err((bytes, "a trickle came back different".into(), true)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err((bytes, "stuck: no echo for 10 s".into(), false))
            }
            Err(e) => return Err((bytes, format!("read: {e}"), false)),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    c.shutdown(Shutdown::Write)
        .map_err(|e| (bytes, format!("half-close: {e}"), false))?;
    let mut rest = Vec::new();
    match c.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Ok(bytes),
        Ok(_) => Err((bytes, "bytes after the last echo".into(), true)),
        Err(e) => Err((bytes, format!("reading the end: {e}"), false)),
    }
}

/// CONNECTs through a running server's egress proxy to a node's stand-in kubelet.
pub(super) fn reverse_load(run: Arc<Run>) {
    let mut rng = Rng::new(run.settings.seed ^ 0xEE);
    while !run.stopped() {
        std::thread::sleep(Duration::from_millis(400));
        let i = rng.below(run.lab.servers.len() as u64) as usize;
        if lock(&run.lab.servers[i]).pid().is_none() {
            continue;
        }
        let j = rng.below(run.lab.agents.len() as u64) as usize;
        let (node, kubelet) = {
            let a = lock(&run.lab.agents[j]);
            (a.node.clone(), a.kubelet.addr)
        };
        let mut data = vec![0u8; 4096];
        rng.fill(&mut data);
        let start = run.now();
        let got = connect_through(
            &run.lab.masters,
            run.lab.egress[i],
            &node,
            kubelet.port(),
            &data,
        );
        let got = got.map(|_| data.clone());
        run.outcome(judge("reverse", start, run.now(), j, &data, got));
    }
}

pub(super) fn connect_through(
    side: &Side,
    proxy: SocketAddr,
    node: &str,
    port: u16,
    data: &[u8],
) -> std::result::Result<(), String> {
    let mut c = connect(side, proxy).map_err(|e| format!("connect to the egress proxy: {e}"))?;
    let req = format!("CONNECT {node}:{port} HTTP/1.1\r\nHost: {node}:{port}\r\n\r\n");
    c.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || c.read(&mut b).map_err(|e| format!("answer: {e}"))? == 0 {
            return Err("no answer from the egress proxy".into());
        }
        head.push(b[0]);
    }
    let status = String::from_utf8_lossy(&head);
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "egress answered {}",
            status.lines().next().unwrap_or("")
        ));
    }
    c.write_all(data).map_err(|e| format!("write: {e}"))?;
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    c.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    if back == data {
        Ok(())
    } else {
        Err(format!("{} bytes back for {}", back.len(), data.len()))
    }
}

// ---------------------------------------------------------------------------------------------
// Faults.
