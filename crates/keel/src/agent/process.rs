//! The program's process group: the program is started as the leader of a group of its own,
//! so stopping it reaches everything it started (unless a process left the group itself).

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::time::Instant;

/// How often a stopping group is looked at for members still alive.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// The process group of a running program. While armed, dropping it kills the whole group
/// with SIGKILL (the agent exiting at once still leaves nothing behind).
#[derive(Debug)]
pub struct ProcessGroup {
    /// The group id (the program's pid); `None` once it must not be signalled any more.
    pgid: Option<Pid>,
}

impl ProcessGroup {
    /// The group `child` leads (it was spawned with `process_group(0)`).
    pub fn of(child: &Child) -> Self {
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .filter(|pid| *pid > 1)
            .map(Pid::from_raw);
        Self { pgid }
    }

    /// Never signals the group again: the leader was reaped after exiting on its own, so its
    /// id may be reused by an unrelated process.
    pub fn disarm(&mut self) {
        self.pgid = None;
    }

    /// Stops the group: SIGTERM to every member, then SIGKILL to those still there after
    /// `grace`; waits for (and reaps) the leader. Disarms the guard.
    pub async fn stop(&mut self, child: &mut Child, grace: Duration) {
        let give_up = Instant::now() + grace;
        self.signal(Signal::SIGTERM);
        if tokio::time::timeout_at(give_up, child.wait()).await.is_ok() {
            // The leader is gone; other members may still be shutting down. They keep the
            // group id in use, so it cannot name another group while they live.
            while self.has_members() && Instant::now() < give_up {
                tokio::time::sleep(GROUP_POLL).await;
            }
        }
        if self.has_members() {
            tracing::warn!(pgid = ?self.pgid, ?grace, "the program's processes outlived SIGTERM; sending SIGKILL");
            self.signal(Signal::SIGKILL);
        }
        if let Err(error) = child.wait().await {
            tracing::debug!(%error, "waiting for the stopped program");
        }
        self.disarm();
    }

    /// Whether a process of the group is still there (a zombie leader counts).
    pub fn has_members(&self) -> bool {
        self.pgid
            .is_some_and(|pgid| !matches!(killpg(pgid, None), Err(Errno::ESRCH)))
    }

    fn signal(&self, signal: Signal) {
        let Some(pgid) = self.pgid else {
            return;
        };
        match killpg(pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(?pgid, ?signal, %error, "cannot signal the program's process group")
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}
