//! The daemon: listen on the socket, serve one frontend at a time with a fresh session, accept
//! the next one when it goes away, forever; SIGTERM or SIGINT end it with status 0.
//!
//! vhost-user-backend's `VhostUserDaemon` handles one connection, so each connection gets its own
//! daemon and [`NetSession`]: when the frontend disconnects or dies, dropping them releases the
//! vrings, the guest memory mappings and the worker threads. The tap (and its watcher) belong
//! to the daemon and outlive sessions.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::{SigSet, Signal};
use thiserror::Error;
use vhost::vhost_user::{Error as VhostError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::backend::{DeviceSettings, NetSession};
use crate::config::{format_mac, Config};
use crate::stats::PairStats;
use crate::watch::{TapSet, WatchError};
use crate::GuestMem;
use splitvmm_common::socket::{self, SocketError};

#[derive(Debug, Error)]
pub enum RunError {
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
    #[error("cannot create a private folder for the message relay: {0}")]
    PrivateDir(io::Error),
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

/// SIGTERM/SIGINT handling shared between the signal thread and the accept loop.
struct Shutdown {
    requested: AtomicBool,
    wake: EventFd,
    /// A duplicate of the listening socket's descriptor, owned here so that it stays valid for
    /// as long as the signal thread may use it (shutdown() acts on the socket, not the fd).
    listener: UnixListener,
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
        // SAFETY: shutdown() on a descriptor this struct owns; no pointers.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
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

    // A live socket is refused before the tap is touched; the socket is created only once the
    // tap is ready, so a frontend (or a test) that sees the socket finds the tap set up.
    if socket::probe(&config.socket)? == socket::SocketState::Live {
        return Err(SocketError::InUse {
            path: config.socket.clone(),
        }
        .into());
    }
    let tap = TapSet::open(&config)?;
    tap.start_watcher()?;
    let private = PrivateDir::new().map_err(RunError::PrivateDir)?;
    let (listener, _socket_guard) = socket::listen(&config.socket)?;
    let path = config.socket.display().to_string();
    let shutdown = Arc::new(Shutdown {
        requested: AtomicBool::new(false),
        wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(RunError::EventFd)?,
        listener: listener.try_clone().map_err(RunError::DupListener)?,
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
        serve_session(
            session_number,
            &settings,
            &listener,
            &private.0,
            &shutdown,
            &path,
        )?;
    }
    log::info!("stopped after {session_number} session(s)");
    // `_socket_guard` removes the socket file; the listener closes after it.
    Ok(())
}

/// A folder only this process can enter (mode 0700, random name), for the relay's internal
/// sockets; removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> io::Result<Self> {
        let template = std::env::temp_dir().join("splitvmm-net-XXXXXX");
        let mut bytes = template.into_os_string().into_vec();
        bytes.push(0);
        // SAFETY: `bytes` is a NUL-terminated template ending in XXXXXX that mkdtemp rewrites
        // in place; it outlives the call.
        let rc = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if rc.is_null() {
            return Err(io::Error::last_os_error());
        }
        bytes.pop();
        Ok(PrivateDir(PathBuf::from(std::ffi::OsString::from_vec(
            bytes,
        ))))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The crate's end of the relay (see `relay`): a listener in the private folder with one
/// connection queued, which `VhostUserDaemon::start` accepts; the relay threads join it to
/// the frontend's connection. Its file is removed at once: nobody else can connect.
fn relay_listener(frontend: UnixStream, private: &Path) -> Result<Listener, String> {
    let internal_path = private.join("relay.sock");
    let (internal, guard) = socket::listen(&internal_path).map_err(|e| e.to_string())?;
    let backend = UnixStream::connect(&internal_path).map_err(|e| e.to_string())?;
    drop(guard);
    crate::relay::start(frontend, backend).map_err(|e| e.to_string())?;
    Ok(Listener::from(internal))
}

/// Accepts one frontend and serves it until it goes away.
fn serve_session(
    number: u64,
    settings: &DeviceSettings,
    listener: &UnixListener,
    private: &Path,
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
    let mut internal = match relay_listener(frontend, private) {
        Ok(l) => l,
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
    if let Err(e) = daemon.start(&mut internal) {
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
