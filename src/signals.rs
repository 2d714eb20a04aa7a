//! Process signals as values: the one place segsync installs signal handlers.
//! The daemon turns them into events; one-shot commands wait for a stop.

use std::io;

use tokio::signal::unix::{Signal as Stream, SignalKind, signal};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: reload the configuration and the rules.
    Reload,
    /// SIGTERM or SIGINT: stop cleanly.
    Stop,
}

/// Installed handlers; signals arrive through [`Signals::next`].
pub struct Signals {
    hup: Option<Stream>,
    term: Stream,
    int: Stream,
}

impl Signals {
    /// Installs SIGTERM and SIGINT handlers, and SIGHUP's when `reload` (otherwise SIGHUP keeps
    /// its default action, which ends the process).
    pub fn install(reload: bool) -> io::Result<Self> {
        Ok(Self {
            hup: if reload { Some(signal(SignalKind::hangup())?) } else { None },
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal.
    pub async fn next(&mut self) -> Signal {
        let hup = async {
            match &mut self.hup {
                Some(hup) => hup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hup => Signal::Reload,
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; never, if the handlers cannot be installed.
pub async fn stop_requested() {
    match Signals::install(false) {
        Ok(mut signals) => while signals.next().await != Signal::Stop {},
        Err(e) => {
            tracing::warn!(error = %e, "state warning");
            std::future::pending::<()>().await;
        }
    }
}
