//! Noticing a backend that hangs up while the guest runs. The VMM is not on the data path, so
//! nothing else would tell: the reconnect thread ([`super::reconnect`]) blocks here on a
//! duplicate of the connection's socket until its peer closes (or the VMM shuts the socket
//! down after a failed message).

use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The peer closed its end (not among nix's named flags).
const POLLRDHUP: PollFlags = PollFlags::from_bits_retain(libc::POLLRDHUP);

/// Blocks until `socket`'s peer hangs up or the socket is shut down.
pub fn wait_for_hang_up(socket: impl AsFd) -> nix::Result<()> {
    loop {
        // Only hang-up events: replies arriving (POLLIN) are the frontend's to read.
        let mut fds = [PollFd::new(socket.as_fd(), POLLRDHUP)];
        match poll(&mut fds, PollTimeout::NONE) {
            // Only POLLRDHUP was asked for; POLLHUP, POLLERR and POLLNVAL come regardless.
            // Any of them means the connection is gone. (nix cannot decode POLLRDHUP in
            // `revents`, so the count is what tells.)
            Ok(ready) if ready > 0 => return Ok(()),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Duration;

    fn watched(socket: UnixStream) -> mpsc::Receiver<nix::Result<()>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(wait_for_hang_up(&socket)));
        rx
    }

    #[test]
    fn notices_the_peer_closing() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let done = watched(ours);
        assert!(done.recv_timeout(Duration::from_millis(50)).is_err());
        drop(theirs);
        done.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    }

    #[test]
    fn notices_our_own_shutdown() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let handle = ours.try_clone().unwrap();
        let done = watched(ours);
        handle.shutdown(Shutdown::Both).unwrap();
        done.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    }
}
