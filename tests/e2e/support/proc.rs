//! Child processes that are stopped by PID when dropped.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A process this test started. Dropping it sends `stop_signal` to its PID, waits up to
/// `grace`, then SIGKILLs its process group (it is started as its own group leader, so helpers
/// it forked itself, such as dockerd's containerd, go with it).
pub struct Proc {
    name: String,
    child: Option<Child>,
    stop_signal: i32,
    grace: Duration,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        stop_signal: i32,
        grace: Duration,
    ) -> Proc {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            stop_signal,
            grace,
            log: log.to_path_buf(),
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        super::read_lossy(&self.log)
    }

    /// The exit status if the process has ended (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
        }
        self.status
    }

    /// Polls `ready` until it holds (then `Ok`), or until the process ends (then `Err(log)`);
    /// panics after 60 s.
    pub fn wait_ready(
        &mut self,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        super::wait_for(what, Duration::from_secs(60), || {
            if self.exited().is_some() {
                return Some(Err(self.log()));
            }
            ready().then_some(Ok(()))
        })
    }

    /// Panics with the log tail if the process has already ended.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.exited() {
            panic!(
                "{} exited early with {st}; log tail:\n{}",
                self.name,
                super::tail(&self.log(), 40)
            );
        }
    }

    pub fn signal(&self, sig: i32) {
        if self.status.is_none() && self.pid() > 0 {
            // SAFETY: plain kill(2) on the PID of a child we spawned and have not reaped.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the process and its group and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(st) = self.exited() {
            return st;
        }
        let pid = self.pid();
        // SAFETY: signals to the PID and process group (same id) of a child we spawned and
        // have not reaped yet, so neither id can have been reused.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        let st = self
            .child
            .as_mut()
            .expect("child")
            .wait()
            .expect("wait after SIGKILL");
        self.status = Some(st);
        st
    }

    /// Sends the stop signal, waits up to the grace period, then kills.
    /// Returns the status and whether the process ended within the grace period.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        if let Some(st) = self.exited() {
            return (st, true);
        }
        self.signal(self.stop_signal);
        if let Some(st) = self.wait_timeout(self.grace) {
            return (st, true);
        }
        eprintln!(
            "{} did not stop within {:?}; killing it",
            self.name, self.grace
        );
        (self.kill(), false)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}
