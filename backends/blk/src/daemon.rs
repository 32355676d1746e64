//! The daemon: listen on the socket, serve one frontend at a time with a fresh session, accept
//! the next one when it goes away, forever; SIGTERM or SIGINT end it with status 0.
//!
//! vhost-user-backend's `VhostUserDaemon` handles one connection, so each connection gets its own
//! daemon and [`BlkSession`]: when the frontend disconnects or dies, dropping them releases the
//! vrings, the guest memory mappings and the worker threads.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::{SigSet, Signal};
use thiserror::Error;
use vhost::vhost_user::{Error as VhostError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::backend::{BlkSession, DeviceSettings};
use crate::config::Config;
use crate::disk::{Disk, DiskError};
use crate::GuestMem;
use splitvmm_common::activation::{self, ActivationError};
use splitvmm_common::socket::{self, SocketError, SocketGuard};

#[derive(Debug, Error)]
pub enum RunError {
    #[error("no socket to serve on: give --socket PATH, or start under systemd socket activation")]
    NoSocket,
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error(transparent)]
    Disk(#[from] DiskError),
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
    /// The exit status for this error: a missing socket is a usage error like a bad command
    /// line (it is one, unless systemd passes the socket); the rest mean the backend cannot run.
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
    listener: Option<UnixListener>,
    /// Whether a signal may shut the listening socket down to unblock an accept(). Not for a
    /// socket from systemd: shutdown() acts on the socket that systemd keeps for the next
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
        // Wakes an accept() that is already blocked (Linux fails it with EINVAL). With a socket
        // from systemd, only the poll wakes; an accept() blocks only when a frontend left between
        // the poll and the accept, until the next frontend connects.
        if let Some(listener) = self.listener.as_ref().filter(|_| self.shut_listener) {
            // SAFETY: shutdown() on a descriptor this struct owns; no pointers.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
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
        let Some(listener) = &self.listener else {
            return Ok(false);
        };
        loop {
            if self.requested() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: listener.as_raw_fd(),
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

/// Serves `config.image` on `config.socket` until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), RunError> {
    // Block the signals before any thread exists, so every thread inherits the mask and only the
    // signal thread receives them (through sigwait).
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().map_err(RunError::SignalMask)?;

    let disk = Arc::new(Disk::open(&config.image, config.readonly, config.direct)?);
    let source = FrontendSource::open(&config)?;
    let shutdown = Arc::new(Shutdown {
        requested: AtomicBool::new(false),
        wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(RunError::EventFd)?,
        listener: match &source {
            FrontendSource::Listen { listener, .. } => {
                Some(listener.try_clone().map_err(RunError::DupListener)?)
            }
            FrontendSource::Connected(_) => None,
        },
        shut_listener: matches!(source, FrontendSource::Listen { guard: Some(_), .. }),
        active: Mutex::new(None),
    });
    start_signal_thread(shutdown.clone(), mask)?;
    // Probed here, once the command line and the socket are known good: where io_uring is
    // unavailable this logs the one fallback line.
    let settings = DeviceSettings {
        disk: disk.clone(),
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        serial: Arc::from(config.serial.as_slice()),
        engine: config.io_engine.usable(),
        poll: std::time::Duration::from_micros(u64::from(config.poll_us)),
    };
    log::info!(
        "serving {} ({} sectors{}{}, {} queue(s) of up to {}, {} I/O) on {}",
        disk.path().display(),
        disk.capacity_sectors(),
        if disk.readonly() { ", read-only" } else { "" },
        if disk.direct() { ", O_DIRECT" } else { "" },
        config.num_queues,
        config.queue_size,
        settings.engine.name(),
        source.describe(),
    );

    let (listener, _socket_guard, path) = match source {
        FrontendSource::Connected(stream) => {
            // One frontend, already connected: serve it, then exit.
            let path = format!("descriptor {}", stream.as_raw_fd());
            serve_session(
                1,
                &settings,
                |d| d.start_with_stream(stream),
                &shutdown,
                &path,
            )?;
            log::info!("the frontend on {path} is gone; exiting");
            return Ok(());
        }
        FrontendSource::Listen {
            listener,
            guard,
            path,
        } => (Listener::from(listener), guard, path),
    };
    let mut listener = listener;
    let mut session_number: u64 = 0;
    while shutdown.wait_for_frontend(&path)? {
        session_number += 1;
        serve_session(
            session_number,
            &settings,
            |d| d.start(&mut listener),
            &shutdown,
            &path,
        )?;
    }
    log::info!("stopped after {session_number} session(s)");
    // `_socket_guard` removes the socket file (one this process made); the listener closes
    // after it.
    Ok(())
}

/// Where frontends come from.
enum FrontendSource {
    /// A listening socket: one this process made at `--socket` (with the guard that removes
    /// it), or one from systemd (no guard: the path is systemd's).
    Listen {
        listener: UnixListener,
        guard: Option<SocketGuard>,
        path: String,
    },
    /// `--fd`: a socket already connected to the one frontend to serve.
    Connected(UnixStream),
}

impl FrontendSource {
    fn open(config: &Config) -> Result<Self, RunError> {
        if let Some(fd) = config.fd {
            return Ok(FrontendSource::Connected(activation::connected_socket(fd)?));
        }
        if let Some(listener) = activation::systemd_listener()? {
            if let Some(ignored) = &config.socket {
                log::info!(
                    "using the socket systemd passed; --socket {} is not created",
                    ignored.display()
                );
            }
            return Ok(FrontendSource::Listen {
                listener,
                guard: None,
                path: "the inherited socket (LISTEN_FDS)".to_owned(),
            });
        }
        let socket = config.socket.as_ref().ok_or(RunError::NoSocket)?;
        let (listener, guard) = socket::listen(socket)?;
        Ok(FrontendSource::Listen {
            listener,
            guard: Some(guard),
            path: socket.display().to_string(),
        })
    }

    fn describe(&self) -> String {
        match self {
            FrontendSource::Listen { path, .. } => path.clone(),
            FrontendSource::Connected(stream) => format!("descriptor {}", stream.as_raw_fd()),
        }
    }
}

/// Gets one frontend through `connect` (accept on the listener, or the connected socket) and
/// serves it until it goes away.
fn serve_session(
    number: u64,
    settings: &DeviceSettings,
    connect: impl FnOnce(&mut VhostUserDaemon<Arc<BlkSession>>) -> Result<(), DaemonError>,
    shutdown: &Shutdown,
    path: &str,
) -> Result<(), RunError> {
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let session = Arc::new(
        BlkSession::new(settings.clone(), mem.clone())
            .map_err(|e| RunError::Session(e.to_string()))?,
    );
    let mut daemon = VhostUserDaemon::new("splitvmm-blk".into(), session.clone(), mem)
        .map_err(|e| RunError::Session(e.to_string()))?;
    session
        .register_completion_fds(&daemon.get_epoll_handlers())
        .map_err(|e| RunError::Session(format!("cannot watch io_uring completions: {e}")))?;
    if let Err(e) = connect(&mut daemon) {
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
    let stats = session
        .stats()
        .iter()
        .enumerate()
        .map(|(q, s)| {
            format!(
                "queue {q}: {} requests ({} failed, {} B read, {} B written)",
                s.requests, s.failed, s.bytes_read, s.bytes_written
            )
        })
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
