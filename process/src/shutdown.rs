//! A shutdown signal that any number of tasks can wait on, including tasks started after it fired.

use tokio::sync::watch;

/// The sending side: fire once, and every [`ShutdownSignal`] resolves.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

/// The waiting side; cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            tx: watch::channel(false).0,
        }
    }

    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl ShutdownSignal {
    /// Resolves once shutdown was triggered (or its sender is gone).
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|fired| *fired).await;
    }

    pub fn fired(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Resolves on SIGTERM or SIGINT: how both binaries learn that they should stop.
pub async fn terminate_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Waits while `busy` holds, looking every 50 ms, for at most `limit`: how a drain waits for
/// its streams, and the agent's start for its first tunnel.
pub async fn wait_while(limit: std::time::Duration, busy: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while busy() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
