//! The console protocol: lines starting with `SPLITVMM-` that the inits, the host scripts and the
//! scenarios print, and their parsing.
//!
//! | line                                  | printed by                                   |
//! |---------------------------------------|----------------------------------------------|
//! | `SPLITVMM-L1-BEGIN uptime=S`          | L1 `/init` when it starts (nested lane)      |
//! | `SPLITVMM-L1-KVM ok` / `missing`      | L1 `/init` after `modprobe kvm-amd`          |
//! | `SPLITVMM-L1-READY uptime=S`          | L1 `/init` with disks mounted, before run.sh |
//! | `SPLITVMM-L1-ERROR text`              | L1 `/init` when it cannot set up             |
//! | `SPLITVMM-L1-DONE rc=N`               | L1 `/init` after run.sh                      |
//! | `SPLITVMM-HOST-DONE rc=N`             | run.sh after the host script (both lanes)    |
//! | `SPLITVMM-VMM-EXIT rc=N`              | the default host script after `splitvmm`     |
//! | `SPLITVMM-GUEST-BEGIN`                | L2 `/init` before `/scenario.sh`             |
//! | `SPLITVMM-GUEST-DONE rc=N`            | L2 `/init` after `/scenario.sh`              |
//! | `SPLITVMM-GUEST-NO-SCENARIO text`     | L2 `/init` when `/scenario.sh` is missing    |
//! | `SPLITVMM-RESULT key=value`           | scenarios and host scripts                   |
//!
//! A marker may be preceded by other text on its line (a kernel message that was cut into it);
//! carriage returns and trailing blanks are ignored.

use std::fmt;

/// One recognised console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    L1Begin,
    L1Kvm(bool),
    L1Ready,
    L1Error(String),
    L1Done { rc: i32 },
    HostDone { rc: i32 },
    VmmExit { rc: i32 },
    GuestBegin,
    GuestDone { rc: i32 },
    GuestNoScenario(String),
    Result { key: String, value: String },
}

const PREFIX: &str = "SPLITVMM-";

impl Marker {
    /// Parses one console line; `None` when it carries no (well-formed) marker.
    pub fn parse(line: &str) -> Option<Marker> {
        let start = line.find(PREFIX)?;
        let body = line[start + PREFIX.len()..].trim_end_matches(['\r', '\n', ' ', '\t']);
        let (tag, rest) = match body.split_once(' ') {
            Some((tag, rest)) => (tag, rest.trim()),
            None => (body, ""),
        };
        match tag {
            "L1-BEGIN" => Some(Marker::L1Begin),
            "L1-KVM" => match rest {
                "ok" => Some(Marker::L1Kvm(true)),
                "missing" => Some(Marker::L1Kvm(false)),
                _ => None,
            },
            "L1-READY" => Some(Marker::L1Ready),
            "L1-ERROR" => Some(Marker::L1Error(rest.to_owned())),
            "L1-DONE" => parse_rc(rest).map(|rc| Marker::L1Done { rc }),
            "HOST-DONE" => parse_rc(rest).map(|rc| Marker::HostDone { rc }),
            "VMM-EXIT" => parse_rc(rest).map(|rc| Marker::VmmExit { rc }),
            "GUEST-BEGIN" => Some(Marker::GuestBegin),
            "GUEST-DONE" => parse_rc(rest).map(|rc| Marker::GuestDone { rc }),
            "GUEST-NO-SCENARIO" => Some(Marker::GuestNoScenario(rest.to_owned())),
            "RESULT" => {
                let (key, value) = rest.split_once('=')?;
                valid_key(key).then(|| Marker::Result {
                    key: key.to_owned(),
                    value: value.to_owned(),
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Marker::L1Begin => write!(f, "{PREFIX}L1-BEGIN"),
            Marker::L1Kvm(ok) => write!(f, "{PREFIX}L1-KVM {}", if *ok { "ok" } else { "missing" }),
            Marker::L1Ready => write!(f, "{PREFIX}L1-READY"),
            Marker::L1Error(text) => write!(f, "{PREFIX}L1-ERROR {text}"),
            Marker::L1Done { rc } => write!(f, "{PREFIX}L1-DONE rc={rc}"),
            Marker::HostDone { rc } => write!(f, "{PREFIX}HOST-DONE rc={rc}"),
            Marker::VmmExit { rc } => write!(f, "{PREFIX}VMM-EXIT rc={rc}"),
            Marker::GuestBegin => write!(f, "{PREFIX}GUEST-BEGIN"),
            Marker::GuestDone { rc } => write!(f, "{PREFIX}GUEST-DONE rc={rc}"),
            Marker::GuestNoScenario(text) => write!(f, "{PREFIX}GUEST-NO-SCENARIO {text}"),
            Marker::Result { key, value } => write!(f, "{PREFIX}RESULT {key}={value}"),
        }
    }
}

/// `rc=N` (and nothing else).
fn parse_rc(rest: &str) -> Option<i32> {
    rest.strip_prefix("rc=")?.parse().ok()
}

/// Result keys: letters, digits, `_`, `-`, `.`.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_marker() {
        let cases = [
            ("SPLITVMM-L1-BEGIN uptime=2.61", Marker::L1Begin),
            ("SPLITVMM-L1-KVM ok", Marker::L1Kvm(true)),
            ("SPLITVMM-L1-KVM missing", Marker::L1Kvm(false)),
            ("SPLITVMM-L1-READY uptime=3.9", Marker::L1Ready),
            (
                "SPLITVMM-L1-ERROR no disk",
                Marker::L1Error("no disk".into()),
            ),
            ("SPLITVMM-L1-DONE rc=0", Marker::L1Done { rc: 0 }),
            ("SPLITVMM-HOST-DONE rc=137", Marker::HostDone { rc: 137 }),
            ("SPLITVMM-VMM-EXIT rc=3", Marker::VmmExit { rc: 3 }),
            ("SPLITVMM-GUEST-BEGIN", Marker::GuestBegin),
            ("SPLITVMM-GUEST-DONE rc=7", Marker::GuestDone { rc: 7 }),
            (
                "SPLITVMM-GUEST-NO-SCENARIO gone",
                Marker::GuestNoScenario("gone".into()),
            ),
            (
                "SPLITVMM-RESULT nproc=2",
                Marker::Result {
                    key: "nproc".into(),
                    value: "2".into(),
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(Marker::parse(line), Some(want.clone()), "{line}");
            // What Display writes parses back to the same marker.
            assert_eq!(Marker::parse(&want.to_string()), Some(want), "{line}");
        }
    }

    #[test]
    fn tolerates_console_noise() {
        assert_eq!(
            Marker::parse("SPLITVMM-GUEST-DONE rc=0\r\r"),
            Some(Marker::GuestDone { rc: 0 })
        );
        assert_eq!(
            Marker::parse(
                "[    3.1] virtio_net virtio1: SPLITVMM-RESULT mac=52:54:00:12:34:56  \r"
            ),
            Some(Marker::Result {
                key: "mac".into(),
                value: "52:54:00:12:34:56".into()
            })
        );
        // The value is the rest of the line, '=' and spaces included.
        assert_eq!(
            Marker::parse("SPLITVMM-RESULT cmd=a=b c"),
            Some(Marker::Result {
                key: "cmd".into(),
                value: "a=b c".into()
            })
        );
        assert_eq!(
            Marker::parse("SPLITVMM-RESULT empty="),
            Some(Marker::Result {
                key: "empty".into(),
                value: String::new()
            })
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        for line in [
            "",
            "Linux version 6.1.0",
            "SPLITVMM-",
            "SPLITVMM-GUEST-DONE",
            "SPLITVMM-GUEST-DONE rc=",
            "SPLITVMM-GUEST-DONE rc=x",
            "SPLITVMM-GUEST-DONE 0",
            "SPLITVMM-L1-KVM maybe",
            "SPLITVMM-RESULT novalue",
            "SPLITVMM-RESULT =1",
            "SPLITVMM-RESULT a b=1",
            "SPLITVMM-UNKNOWN x=1",
        ] {
            assert_eq!(Marker::parse(line), None, "{line:?}");
        }
    }
}
