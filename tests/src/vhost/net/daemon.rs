//! `splitvmm-net` as a process a test owns, run inside a network namespace the test made, on a
//! tap it creates there with `--host-ip` set: killed when dropped (its stderr printed when the
//! test is failing), its socket awaited with a deadline.
//!
//! The binary is `SPLITVMM_NET` when set, else `splitvmm-net` in the cargo target folder the
//! running test binary lives in (`target/<profile>/deps/<test>` → `target/<profile>/`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::vhost::blk_daemon::ProcUsage;
use crate::vhost::process::{workspace_binary, BackendProcess, ProcessError, TempDir};

use super::netns::{NetNs, NetNsError};

/// The guest's MAC the daemon is started with.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The tap's (host's) address and the guest's, in the test's namespace.
pub const HOST_IP: [u8; 4] = [10, 77, 0, 1];
pub const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
pub const TAP: &str = "svtap0";

#[derive(Debug, thiserror::Error)]
pub enum NetDaemonError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error(
        "splitvmm-net binary not found at {0} (build it: `cargo build -p splitvmm-net`, or set \
         SPLITVMM_NET)"
    )]
    NoBinary(PathBuf),
    #[error("cannot find the running test binary: {0}")]
    CurrentExe(std::io::Error),
    #[error("splitvmm-net never logged `{needle}` within {within:?}; stderr:\n{stderr}")]
    NoLogLine {
        needle: String,
        within: Duration,
        stderr: String,
    },
}

#[derive(Debug, Clone)]
pub struct NetDaemonOptions {
    pub num_queue_pairs: u16,
    pub queue_size: Option<u16>,
    pub mtu: Option<u16>,
    /// `SPLITVMM_LOG` for the daemon.
    pub log_level: &'static str,
    pub start_timeout: Duration,
    pub extra_args: Vec<String>,
}

impl Default for NetDaemonOptions {
    fn default() -> Self {
        NetDaemonOptions {
            num_queue_pairs: 1,
            queue_size: None,
            mtu: None,
            log_level: "info",
            start_timeout: Duration::from_secs(10),
            extra_args: Vec::new(),
        }
    }
}

/// The `splitvmm-net` binary the tests run.
pub fn net_binary() -> Result<PathBuf, NetDaemonError> {
    let path =
        workspace_binary("splitvmm-net", "SPLITVMM_NET").map_err(NetDaemonError::CurrentExe)?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(NetDaemonError::NoBinary(path))
    }
}

pub fn ip_text(ip: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(ip).to_string()
}

/// A running `splitvmm-net` in its own namespace, serving tap [`TAP`] with [`HOST_IP`]/24.
#[derive(Debug)]
pub struct NetDaemon {
    // Field order: the process dies before its namespace and folder go.
    process: BackendProcess,
    ns: NetNs,
    dir: TempDir,
}

impl NetDaemon {
    pub fn start(opts: &NetDaemonOptions) -> Result<Self, NetDaemonError> {
        let ns = NetNs::new("net")?;
        let dir = TempDir::new("net")?;
        let socket = dir.path().join("net.sock");
        let mut cmd = ns.command(net_binary()?);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--tap", TAP, "--mac"])
            .arg(
                GUEST_MAC
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            )
            .arg("--host-ip")
            .arg(format!("{}/24", ip_text(HOST_IP)))
            .arg("--num-queue-pairs")
            .arg(opts.num_queue_pairs.to_string())
            .env("SPLITVMM_LOG", opts.log_level);
        if let Some(n) = opts.queue_size {
            cmd.arg("--queue-size").arg(n.to_string());
        }
        if let Some(n) = opts.mtu {
            cmd.arg("--mtu").arg(n.to_string());
        }
        cmd.args(&opts.extra_args);
        let process = BackendProcess::spawn(
            "splitvmm-net",
            &mut cmd,
            dir.path(),
            socket,
            opts.start_timeout,
        )?;
        let d = NetDaemon { process, ns, dir };
        // The daemon makes its socket once the tap is up with its address.
        d.ns.add_neighbour(TAP, &ip_text(GUEST_IP), &GUEST_MAC)?;
        Ok(d)
    }

    pub fn socket(&self) -> &Path {
        self.process.socket()
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn process(&mut self) -> &mut BackendProcess {
        &mut self.process
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    pub fn usage(&self) -> Option<ProcUsage> {
        ProcUsage::of(self.pid())
    }

    /// The tap's MAC (the destination of frames for the host).
    pub fn tap_mac(&self) -> Result<[u8; 6], NetDaemonError> {
        Ok(self.ns.mac_of(TAP)?)
    }

    /// Waits until the daemon's stderr has `needle` at least `count` times.
    pub fn wait_log(
        &self,
        needle: &str,
        count: usize,
        within: Duration,
    ) -> Result<(), NetDaemonError> {
        let deadline = Instant::now() + within;
        loop {
            let text = self.stderr();
            if text.matches(needle).count() >= count {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NetDaemonError::NoLogLine {
                    needle: needle.to_owned(),
                    within,
                    stderr: text,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for NetDaemon {
    fn drop(&mut self) {
        // SIGTERM first, so the daemon removes its private folder and socket; the process
        // owner SIGKILLs it afterwards in any case.
        self.process.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.process.wait_exit(Duration::from_secs(2));
    }
}
