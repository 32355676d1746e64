//! A network namespace a test owns: made with `ip netns add` under a unique name, deleted on
//! drop (with every interface in it). Commands run inside with `ip -n` / `ip netns exec`;
//! sockets are made inside by a helper thread that joins the namespace (`setns` moves only the
//! calling thread), and keep living there when used from any thread.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot open namespace {name}: {source}")]
    Open {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot enter namespace {name}: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
    #[error("the thread entering namespace {0} panicked")]
    Thread(String),
    #[error("interface {name} in {ns}: {what}")]
    Interface {
        ns: String,
        name: String,
        what: String,
    },
}

fn run(cmd: &mut Command) -> Result<String, NetNsError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| NetNsError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetNsError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A fresh namespace named `svmm-<label>-<pid>-<n>` with its loopback up.
    pub fn new(label: &str) -> Result<Self, NetNsError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "svmm-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // A leftover of an earlier process with the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No IPv6 chatter (router solicitations, MLD) on the test's interfaces: frames the
        // tests do not send would otherwise race with the ones they count.
        run(ns.command("sysctl").args([
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetNsError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which execs it:
    /// the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that has joined the namespace (sockets it makes live there).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetNsError> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).map_err(|source| NetNsError::Open {
            name: self.name.clone(),
            source,
        })?;
        let name = self.name.clone();
        std::thread::spawn(move || {
            // SAFETY: setns on a namespace descriptor we hold open; it changes only this
            // thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetNsError::Enter {
                    name,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .map_err(|_| NetNsError::Thread(self.name.clone()))?
    }

    /// The MAC address of interface `dev`.
    pub fn mac_of(&self, dev: &str) -> Result<[u8; 6], NetNsError> {
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        let bad = |what: &str| NetNsError::Interface {
            ns: self.name.clone(),
            name: dev.to_owned(),
            what: what.to_owned(),
        };
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(|| bad("has no link/ether address"))?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            return Err(bad("has a malformed address"));
        }
        for (b, p) in mac.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16).map_err(|_| bad("has a malformed address"))?;
        }
        Ok(mac)
    }

    /// Waits until interface `dev` exists (and, with `addr`, carries that IPv4 address).
    pub fn wait_for_interface(
        &self,
        dev: &str,
        addr: Option<&str>,
        within: Duration,
    ) -> Result<(), NetNsError> {
        let deadline = Instant::now() + within;
        loop {
            let ready = match addr {
                Some(a) => self
                    .ip(&["-o", "-4", "addr", "show", "dev", dev])
                    .is_ok_and(|out| out.contains(&format!("inet {a}/"))),
                None => self.ip(&["link", "show", "dev", dev]).is_ok(),
            };
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NetNsError::Interface {
                    ns: self.name.clone(),
                    name: dev.to_owned(),
                    what: format!("did not appear (with address {addr:?}) within {within:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A permanent neighbour entry, so the host sends to `ip` without ARP.
    pub fn add_neighbour(&self, dev: &str, ip: &str, mac: &[u8; 6]) -> Result<(), NetNsError> {
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        self.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .map(drop)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
