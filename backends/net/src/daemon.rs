//! The daemon: listen on the socket, serve one frontend at a time with a fresh session, accept
//! the next one when it goes away, forever; SIGTERM or SIGINT end it with status 0.
//!
//! vhost-user-backend's `VhostUserDaemon` handles one connection, so each connection gets its own
//! daemon and [`NetSession`]: when the frontend disconnects or dies, dropping them releases the
//! vrings, the guest memory mappings and the worker threads. The tap (and its watcher) belong
//! to the daemon and outlive sessions.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::{SigSet, Signal};
use thiserror::Error;
use vhost::vhost_user::Error as VhostError;
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::backend::{DeviceSettings, NetSession};
use crate::config::{format_mac, Config};
use crate::stats::PairStats;
use crate::watch::{TapSet, WatchError};
use crate::GuestMem;
use splitvmm_common::activation;
use splitvmm_common::socket::{self, SocketError};

#[derive(Debug, Error)]
pub enum RunError {
    #[error("no socket to serve on: give --socket PATH, or start under systemd socket activation")]
    NoSocket,
    #[error(transparent)]
    Activation(#[from] splitvmm_common::activation::ActivationError),
    #[error(transparent)]
    Tap(#[from] WatchError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot block SIGTERM/SIGINT for the signal thread: {0}")]
    SignalMask(nix::Error),
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot create the shutdown eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot duplicate the listening socket: {0}")]
    DupListener(io::Error),
    #[error("cannot wait for a frontend on {path}: {source}")]
    Poll { path: String, source: io::Error },
    #[error("cannot set up a session for a frontend: {0}")]
    Session(String),
    #[error("cannot accept a frontend on {path}: {reason}")]
    Accept { path: String, reason: String },
}

impl RunError {
    /// The exit status: a missing socket is a usage error like a bad command line; the rest
    /// mean the backend cannot run.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::NoSocket => crate::EXIT_USAGE,
            _ => crate::EXIT_RUN_ERROR,
        }
    }
}

/// SIGTERM/SIGINT handling shared between the signal thread and the accept loop.
struct Shutdown {
    requested: AtomicBool,
    wake: EventFd,
    /// A duplicate of the listening socket's descriptor, owned here so that it stays valid for
    /// as long as the signal thread may use it (shutdown() acts on the socket, not the fd).
    listener: UnixListener,
    /// Whether a signal may shut the listening socket down to unblock an accept(). Not for a
    /// socket from systemd or a supervisor: shutdown() acts on the socket they keep for the next
    /// instance of this backend, which could then never accept again.
    shut_listener: bool,
    active: Mutex<Option<ShutdownHandle>>,
}

impl Shutdown {
    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    fn request(&self, signal: Signal) {
        log::info!("{signal} received; shutting down");
        self.requested.store(true, Ordering::Release);
        // Wakes the accept loop's poll. A failure means the counter is saturated: already awake.
        let _ = self.wake.write(1);
        // Wakes an accept() that is already blocked (Linux fails it with EINVAL).
        if self.shut_listener {
            // SAFETY: shutdown() on a descriptor this struct owns; no pointers.
            unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(handle) = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            handle.shutdown();
        }
    }

    fn set_active(&self, handle: Option<ShutdownHandle>) {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        *active = handle;
        // A signal that came before the handle was stored still ends this session.
        if self.requested() {
            if let Some(handle) = active.as_ref() {
                handle.shutdown();
            }
        }
    }

    /// Blocks until a frontend is waiting (true) or shutdown was requested (false).
    fn wait_for_frontend(&self, path: &str) -> Result<bool, RunError> {
        loop {
            if self.requested() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is an array of two pollfd structs that outlives the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let source = io::Error::last_os_error();
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RunError::Poll {
                    path: path.to_owned(),
                    source,
                });
            }
            if self.requested() {
                return Ok(false);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }
}

fn start_signal_thread(shutdown: Arc<Shutdown>, mask: SigSet) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match mask.wait() {
                Ok(signal) => shutdown.request(signal),
                Err(e) => {
                    log::error!("waiting for signals failed: {e}");
                    return;
                }
            }
        })
        .map(drop)
        .map_err(|source| RunError::Thread {
            what: "signal",
            source,
        })
}

/// Serves the tap of `config` on `config.socket` until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), RunError> {
    // Block the signals before any thread exists, so every thread inherits the mask and only the
    // signal thread receives them (through sigwait).
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().map_err(RunError::SignalMask)?;

    // A socket from systemd (or splitvmm-supervise) is theirs: never removed or shut down here.
    let inherited = activation::systemd_listener()?;
    let own_socket = match (&inherited, &config.socket) {
        (Some(_), Some(ignored)) => {
            log::info!(
                "using the socket systemd passed; --socket {} is not created",
                ignored.display()
            );
            None
        }
        (Some(_), None) => None,
        (None, Some(path)) => Some(path),
        (None, None) => return Err(RunError::NoSocket),
    };
    // A live socket is refused before the tap is touched; the socket is created only once the
    // tap is ready, so a frontend (or a test) that sees the socket finds the tap set up.
    if let Some(path) = own_socket {
        if socket::probe(path)? == socket::SocketState::Live {
            return Err(SocketError::InUse { path: path.clone() }.into());
        }
    }
    let tap = TapSet::open(&config)?;
    tap.start_watcher()?;
    let (listener, _socket_guard, path) = match (inherited, own_socket) {
        (Some(listener), _) => (
            listener,
            None,
            "the inherited socket (LISTEN_FDS)".to_owned(),
        ),
        (None, Some(path)) => {
            let (listener, guard) = socket::listen(path)?;
            (listener, Some(guard), path.display().to_string())
        }
        (None, None) => return Err(RunError::NoSocket),
    };
    let shutdown = Arc::new(Shutdown {
        requested: AtomicBool::new(false),
        wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(RunError::EventFd)?,
        listener: listener.try_clone().map_err(RunError::DupListener)?,
        shut_listener: _socket_guard.is_some(),
        active: Mutex::new(None),
    });
    start_signal_thread(shutdown.clone(), mask)?;
    let settings = DeviceSettings {
        tap: tap.clone(),
        mac: config.mac,
        mtu: config.mtu,
        num_queue_pairs: config.num_queue_pairs,
        queue_size: config.queue_size,
        stats: (0..config.num_queue_pairs)
            .map(|_| Arc::new(PairStats::default()))
            .collect(),
    };
    log::info!(
        "serving tap {} (mac {}, mtu {}, {} queue pair(s) of up to {}{}) on {path}",
        tap.name(),
        format_mac(&config.mac),
        config.mtu,
        config.num_queue_pairs,
        config.queue_size,
        config
            .host_ip
            .map(|ip| format!(", host {}/{}", ip.addr, ip.prefix))
            .unwrap_or_default(),
    );

    let mut session_number: u64 = 0;
    while shutdown.wait_for_frontend(&path)? {
        session_number += 1;
        serve_session(session_number, &settings, &listener, &shutdown, &path)?;
    }
    log::info!("stopped after {session_number} session(s)");
    // `_socket_guard` removes the socket file; the listener closes after it.
    Ok(())
}

/// Accepts one frontend and serves it until it goes away.
fn serve_session(
    number: u64,
    settings: &DeviceSettings,
    listener: &UnixListener,
    shutdown: &Shutdown,
    path: &str,
) -> Result<(), RunError> {
    let frontend = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(_) if shutdown.requested() => return Ok(()),
        Err(e) => {
            return Err(RunError::Accept {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
    };
    // The crate's end of the relay (see `relay`): one end of a socketpair, served with
    // start_with_stream; the relay threads join the other end to the frontend's connection.
    let internal = match UnixStream::pair()
        .and_then(|(ours, crates)| crate::relay::start(frontend, ours).map(|()| crates))
    {
        Ok(stream) => stream,
        Err(e) => {
            // This frontend is dropped; the next one may fare better.
            log::error!("session {number}: cannot set up the message relay: {e}");
            return Ok(());
        }
    };
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let session = Arc::new(
        NetSession::new(settings.clone(), mem.clone())
            .map_err(|e| RunError::Session(e.to_string()))?,
    );
    let mut daemon = VhostUserDaemon::new("splitvmm-net".into(), session.clone(), mem)
        .map_err(|e| RunError::Session(e.to_string()))?;
    session
        .register_tap_pollers(&daemon.get_epoll_handlers())
        .map_err(|e| RunError::Session(format!("cannot watch the tap: {e}")))?;
    if let Err(e) = daemon.start_with_stream(internal) {
        drop(daemon);
        session.release_exit_fds();
        if shutdown.requested() {
            return Ok(());
        }
        return Err(RunError::Accept {
            path: path.to_owned(),
            reason: e.to_string(),
        });
    }
    log::info!("session {number}: frontend connected");
    shutdown.set_active(daemon.shutdown_handle());
    let result = daemon.wait();
    shutdown.set_active(None);
    session.stop();
    // Dropping the daemon drops the crate's handler, which stops and joins the worker threads
    // and unmaps guest memory (nothing else holds the session's memory once it is gone).
    drop(daemon);
    session.release_exit_fds();
    let stats = settings
        .stats
        .iter()
        .enumerate()
        .map(|(pair, s)| format!("pair {pair}: {}", s.snapshot()))
        .collect::<Vec<_>>()
        .join("; ");
    match result {
        Ok(()) => log::info!("session {number}: frontend disconnected; {stats}"),
        Err(DaemonError::HandleRequest(VhostError::Disconnected))
        | Err(DaemonError::HandleRequest(VhostError::PartialMessage)) => {
            log::info!("session {number}: frontend disconnected; {stats}")
        }
        Err(e) => log::warn!("session {number}: ended with an error: {e}; {stats}"),
    }
    Ok(())
}
