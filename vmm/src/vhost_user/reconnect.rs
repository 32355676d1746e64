//! Getting a device's backend back: one thread per device waits for its connection to hang
//! up, then connects to the same socket path again with back-off (10 ms doubling to 1 s, with
//! one log line per interval however many attempts it holds) until a backend answers, and
//! hands the new connection the whole running state ([`Link::take_over`]). Meanwhile the
//! guest's kicks pile up in the ioeventfds, which stay registered with KVM, so the guest sees
//! a pause. By default it never gives up; `reconnect_ms=N` fails the device after N ms.
//! Also: waiting for a backend that is not there yet at start (`wait=on`).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::frontend::{Requirements, VhostUserConnection, VhostUserError};
use super::link::{lock, AfterHangUp, LinkError, SharedLink};
use super::watch::wait_for_hang_up;

/// First delay between attempts; doubles up to [`MAX_DELAY`].
pub const FIRST_DELAY: Duration = Duration::from_millis(10);
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// At most one "still reconnecting" line per this much time.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Delays between attempts: doubling from a first delay up to a ceiling.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(FIRST_DELAY, MAX_DELAY)
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next.min(self.max);
        self.next = delay.saturating_mul(2).min(self.max);
        delay
    }
}

/// Rate limit for progress lines: the first is due at once, then one per interval.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
}

impl LogLimit {
    pub fn new(interval: Duration) -> Self {
        LogLimit {
            interval,
            last: None,
        }
    }

    /// Whether a line may be logged at `now` (and if so, counts it as logged).
    pub fn due(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// Connects to `path`; with `wait`, a backend that is not there yet (no socket, refused) is
/// waited for with back-off instead of failing.
pub fn connect(
    name: &str,
    path: &Path,
    needs: Requirements,
    wait: bool,
) -> Result<VhostUserConnection, VhostUserError> {
    let mut backoff = Backoff::default();
    let mut log_limit = LogLimit::new(LOG_INTERVAL);
    let started = Instant::now();
    loop {
        match VhostUserConnection::connect(path, needs) {
            Err(error @ VhostUserError::Connect { .. }) if wait => {
                if log_limit.due(Instant::now()) {
                    log::info!(
                        "{name}: waiting for a vhost-user backend ({:.1} s so far): {error}",
                        started.elapsed().as_secs_f64()
                    );
                }
                std::thread::sleep(backoff.next_delay());
            }
            other => return other,
        }
    }
}

/// Starts the thread that watches `socket` (the first connection's) and reconnects.
/// `give_up_after`: how long one outage may last before the device fails; `None`: forever.
pub fn spawn(
    link: SharedLink,
    socket: OwnedFd,
    give_up_after: Option<Duration>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vhost-user-link".into())
        .spawn(move || watch_and_reconnect(&link, socket, give_up_after))
        .map(|_| ())
}

fn watch_and_reconnect(link: &SharedLink, mut socket: OwnedFd, give_up_after: Option<Duration>) {
    let (name, path) = {
        let link = lock(link);
        (link.name().to_owned(), link.path().to_owned())
    };
    let fail = |why: &str| {
        log::error!(
            "{name}: {why}; the device is marked failed (the VMM and the guest keep running)"
        );
        lock(link).fail();
    };
    loop {
        if let Err(error) = wait_for_hang_up(&socket) {
            return fail(&format!("cannot watch the backend socket: {error}"));
        }
        drop(socket);
        let verdict = lock(link).hung_up();
        match verdict {
            AfterHangUp::Fail(why) => {
                return fail(&format!("the vhost-user backend hung up; {why}"));
            }
            AfterHangUp::Reconnect if give_up_after == Some(Duration::ZERO) => {
                return fail("the vhost-user backend hung up and reconnect_ms=0");
            }
            AfterHangUp::Reconnect => log::warn!(
                "{name}: the vhost-user backend hung up; reconnecting to {} \
                 (the guest's requests wait)",
                path.display()
            ),
        }
        match reconnect(link, &name, &path, give_up_after) {
            Ok(new) => socket = new,
            Err(why) => return fail(&why),
        }
    }
}

/// Why one attempt did not get the device going again.
enum Attempt {
    /// Try again later (no backend yet, or it failed the handshake).
    Retry(String),
    /// Never: the backend came back unable to serve what the guest was promised.
    Fatal(String),
}

/// Attempts until one takes over the device; returns the new connection's socket to watch,
/// or why the device must fail.
fn reconnect(
    link: &SharedLink,
    name: &str,
    path: &Path,
    give_up_after: Option<Duration>,
) -> Result<OwnedFd, String> {
    let needs = lock(link).requirements();
    let started = Instant::now();
    let mut backoff = Backoff::default();
    let mut log_limit = LogLimit::new(LOG_INTERVAL);
    // The first line is the hang-up's; progress lines come one interval later.
    log_limit.due(started);
    let mut attempts = 0u64;
    loop {
        std::thread::sleep(backoff.next_delay());
        attempts += 1;
        let error = match attempt(link, path, needs) {
            Ok(socket) => {
                log::warn!(
                    "{name}: reconnected to {} after {} ms ({attempts} attempts); \
                     queues resumed",
                    path.display(),
                    started.elapsed().as_millis()
                );
                return Ok(socket);
            }
            Err(Attempt::Fatal(why)) => return Err(why),
            Err(Attempt::Retry(error)) => error,
        };
        if let Some(limit) = give_up_after.filter(|limit| started.elapsed() >= *limit) {
            return Err(format!(
                "no vhost-user backend took over within reconnect_ms={} ({attempts} attempts; \
                 last: {error})",
                limit.as_millis()
            ));
        }
        if log_limit.due(Instant::now()) {
            log::warn!(
                "{name}: still reconnecting ({attempts} attempts in {:.1} s; last: {error})",
                started.elapsed().as_secs_f64()
            );
        }
    }
}

fn attempt(link: &SharedLink, path: &Path, needs: Requirements) -> Result<OwnedFd, Attempt> {
    // Connecting and negotiating need nothing of the device: done without its lock, so the
    // vCPUs are not held up by a backend that is slow to answer.
    let connection = VhostUserConnection::connect(path, needs)
        .map_err(|error| Attempt::Retry(error.to_string()))?;
    let socket = connection
        .watch_socket()
        .map_err(|error| Attempt::Retry(format!("cannot watch {}: {error}", path.display())))?;
    match lock(link).take_over(connection) {
        Ok(()) => Ok(socket),
        Err(error @ LinkError::FeaturesLost { .. }) => Err(Attempt::Fatal(error.to_string())),
        Err(error) => Err(Attempt::Retry(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..10)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        let mut odd = Backoff::new(Duration::from_secs(3), Duration::from_secs(1));
        assert_eq!(odd.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn progress_lines_are_rate_limited() {
        let mut limit = LogLimit::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(limit.due(t0));
        assert!(!limit.due(t0 + Duration::from_secs(1)));
        assert!(!limit.due(t0 + Duration::from_millis(4999)));
        assert!(limit.due(t0 + Duration::from_secs(5)));
        assert!(!limit.due(t0 + Duration::from_secs(6)));
    }

    #[test]
    fn waiting_connect_gives_up_on_nothing_but_a_missing_backend() {
        // Without wait, a missing socket fails at once.
        let needs = Requirements {
            num_queues: 1,
            config: false,
        };
        let missing = Path::new("/nonexistent/splitvmm-test.sock");
        assert!(matches!(
            connect("t", missing, needs, false),
            Err(VhostUserError::Connect { .. })
        ));
    }
}

#[cfg(test)]
#[path = "reconnect_tests.rs"]
mod scripted;
