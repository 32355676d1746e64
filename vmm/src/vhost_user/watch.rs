//! Noticing a backend that hangs up while the guest runs. The VMM is not on the data path, so
//! nothing else would tell: a thread per connection waits for the socket's peer to close and
//! marks the device failed, with a log line, while the VMM and the guest keep running.
//! (Reconnecting to a restarted backend is later work.)

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The peer closed its end (not among nix's named flags).
const POLLRDHUP: PollFlags = PollFlags::from_bits_retain(libc::POLLRDHUP);

/// Watches `socket` (a duplicate of the connection's fd) until the peer hangs up, then sets
/// `failed` and logs which device lost its backend.
pub fn spawn_hangup_watcher(
    name: String,
    socket: OwnedFd,
    failed: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vhost-user-watch".into())
        .spawn(move || {
            loop {
                // Only hang-up events: replies arriving (POLLIN) are the frontend's to read.
                let mut fds = [PollFd::new(socket.as_fd(), POLLRDHUP)];
                match poll(&mut fds, PollTimeout::NONE) {
                    // Only POLLRDHUP was asked for; POLLHUP, POLLERR and POLLNVAL come
                    // regardless. Any of them means the connection is gone. (nix cannot decode
                    // POLLRDHUP in `revents`, so the count is what tells.)
                    Ok(ready) if ready > 0 => break,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(error) => {
                        log::warn!("{name}: cannot watch the backend socket: {error}");
                        return;
                    }
                }
            }
            failed.store(true, Ordering::Release);
            log::error!(
                "{name}: the vhost-user backend hung up; the device is marked failed \
                 (the VMM and the guest keep running)"
            );
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    #[test]
    fn notices_the_peer_closing() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let failed = Arc::new(AtomicBool::new(false));
        spawn_hangup_watcher("test".into(), OwnedFd::from(ours), failed.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!failed.load(Ordering::Acquire));
        drop(theirs);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !failed.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(failed.load(Ordering::Acquire));
    }
}
