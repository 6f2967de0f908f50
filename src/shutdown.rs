//! One shutdown signal for the whole process.
//!
//! hyper's graceful shutdown waits for open bodies forever (hyper #2787), so
//! long polls and event streams watch this signal themselves and finish:
//! polls answer with their cursor, streams end after flushing.

use tokio::sync::watch;

/// Fires the signal. Dropping it also fires it, so a crashed owner never
/// leaves waiters hanging.
pub(crate) struct Trigger(watch::Sender<bool>);

/// A cheap, cloneable view of the signal.
#[derive(Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

pub(crate) fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub(crate) fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub(crate) async fn wait(&mut self) {
        // An error means the trigger was dropped: treat as fired.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
