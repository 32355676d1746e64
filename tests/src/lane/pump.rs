//! Driving a started machine to its end: read its console until it exits, the deadline passes,
//! or it lingers after saying it is done.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::console::{Console, Next};
use super::markers::Marker;
use super::process::OwnedChild;

/// After the final marker, how long the machine gets to exit by itself (power-off, QEMU
/// teardown) before it is killed.
const LINGER: Duration = Duration::from_secs(15);
/// After the console closes, how long the process gets to be reaped.
const REAP: Duration = Duration::from_secs(10);

pub enum End {
    /// The console closed or the machine lingered after `is_final`; its exit status if it
    /// exited by itself.
    Exited(Option<ExitStatus>),
    /// The deadline passed first; the machine was killed.
    Deadline,
}

/// Reads `console` until `child` ends. `is_final` recognises the marker after which only the
/// power-off remains.
pub fn pump(
    console: &mut Console,
    child: &mut OwnedChild,
    deadline: Instant,
    is_final: impl Fn(&Marker) -> bool,
) -> End {
    let mut final_seen: Option<Instant> = None;
    loop {
        let limit = final_seen.map_or(deadline, |at| deadline.min(at + LINGER));
        let markers_before = console.timeline().len();
        match console.next(limit) {
            Next::Line => {
                let new_final = console.timeline()[markers_before..]
                    .iter()
                    .any(|(_, m)| is_final(m));
                if final_seen.is_none() && new_final {
                    final_seen = Some(Instant::now());
                }
            }
            Next::Eof => {
                let status = child.wait_timeout(REAP);
                if status.is_none() {
                    child.kill();
                }
                return End::Exited(status);
            }
            Next::Deadline => {
                child.kill();
                return if final_seen.is_some() {
                    End::Exited(None)
                } else {
                    End::Deadline
                };
            }
        }
    }
}
