//! A child process a test fixture owns: killed (with its process group, when it leads one) and
//! reaped when dropped, and killed by the kernel if the thread that started it dies. Shared by
//! the lane fixture (QEMU, host scripts) and the vhost fixtures (backend daemons).

use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

#[derive(Debug)]
pub struct OwnedChild {
    child: Child,
    /// Whether the child leads its own process group (killed as a whole).
    group: bool,
    exited: Option<ExitStatus>,
}

impl OwnedChild {
    /// Spawns `cmd` with the stdio the caller set up. With `group`, the child gets its own
    /// process group so that what it starts can be killed with it.
    pub fn spawn(cmd: &mut Command, group: bool) -> std::io::Result<Self> {
        if group {
            cmd.process_group(0);
        }
        // SAFETY: the closure runs in the forked child before exec. It only calls prctl(2),
        // which is async-signal-safe, touches no lock and allocates nothing (the error path
        // builds an io::Error from an errno, which does not allocate).
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        Ok(OwnedChild {
            child: cmd.spawn()?,
            group,
            exited: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `within` for the child to exit.
    pub fn wait_timeout(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the child (and its group) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.group {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // The group outlives its leader while members remain; ESRCH means it is empty.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
        self.exited
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        self.kill();
    }
}
