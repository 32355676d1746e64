//! Memory of the VMM under measurement: its processes (the one started and its descendants)
//! from /proc, with the guest RAM mapping told apart from the VMM's own memory.

/// Memory of the VMM's processes (the one started and its descendants), in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemSample {
    /// Sum of `Rss` over every mapping.
    pub rss_kib: u64,
    /// `Rss` of the guest RAM mapping(s).
    pub ram_kib: u64,
    /// `Anonymous` outside the guest RAM mapping(s): the VMM's private heap, stacks, ROM copies.
    pub anon_kib: u64,
    /// `VmHWM` (peak RSS, guest RAM included), summed over the processes.
    pub hwm_kib: u64,
    /// How many guest RAM mappings matched.
    pub ram_mappings: u32,
    pub processes: u32,
}

impl MemSample {
    /// RSS minus the guest RAM pages: what the VMM itself costs.
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.ram_kib)
    }

    fn add(&mut self, other: &MemSample) {
        self.rss_kib += other.rss_kib;
        self.ram_kib += other.ram_kib;
        self.anon_kib += other.anon_kib;
        self.hwm_kib += other.hwm_kib;
        self.ram_mappings += other.ram_mappings;
        self.processes += other.processes;
    }
}

/// Sums one `/proc/PID/smaps`: every mapping's `Rss`, and separately those whose path contains
/// `ram_mapping`.
pub fn parse_smaps(text: &str, ram_mapping: &str) -> MemSample {
    let mut sample = MemSample {
        processes: 1,
        ..MemSample::default()
    };
    let mut in_ram = false;
    for line in text.lines() {
        if let Some((field, rest)) = line.split_once(':') {
            // Field lines are `Name:   123 kB`; mapping headers start with a hex range.
            if !field.contains(' ') && !field.contains('-') {
                let kib = rest
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                match field {
                    "Rss" => {
                        sample.rss_kib += kib;
                        if in_ram {
                            sample.ram_kib += kib;
                        }
                    }
                    "Anonymous" if !in_ram => sample.anon_kib += kib,
                    _ => {}
                }
                continue;
            }
        }
        // A header: `start-end perms offset dev inode [path]`; the path may contain spaces.
        let path = line.split_whitespace().nth(5).map(|_| {
            line.splitn(6, char::is_whitespace)
                .nth(5)
                .unwrap_or("")
                .trim()
        });
        in_ram = path.is_some_and(|p| p.contains(ram_mapping));
        if in_ram {
            sample.ram_mappings += 1;
        }
    }
    sample
}

/// `VmHWM` from `/proc/PID/status`, in KiB.
fn parse_hwm(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The parent pid from `/proc/PID/stat` (the field after the `(comm)`, which may hold spaces).
fn parse_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and its descendants, from `/proc/*/stat`.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.filter_map(Result::ok) {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .as_deref()
                .and_then(parse_ppid)
            {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(child, _)| *child),
        );
        i += 1;
    }
    tree
}

/// Samples the memory of `pid` and its descendants.
pub fn sample_memory(pid: u32, ram_mapping: &str) -> Result<MemSample, String> {
    let mut total = MemSample::default();
    for (i, p) in process_tree(pid).into_iter().enumerate() {
        let smaps = match std::fs::read_to_string(format!("/proc/{p}/smaps")) {
            Ok(text) => text,
            // A descendant may be gone already; the VMM itself must be there.
            Err(e) if i == 0 => return Err(format!("reading /proc/{p}/smaps: {e}")),
            Err(_) => continue,
        };
        let mut sample = parse_smaps(&smaps, ram_mapping);
        sample.hwm_kib = std::fs::read_to_string(format!("/proc/{p}/status"))
            .map(|s| parse_hwm(&s))
            .unwrap_or(0);
        total.add(&sample);
    }
    if total.ram_mappings == 0 {
        return Err(format!(
            "no mapping whose path contains {ram_mapping:?} in the smaps of pid {pid} or its \
             children: cannot tell guest RAM from VMM overhead"
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d4c0a00000-55d4c0b00000 r-xp 00000000 fe:01 1234                       /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Anonymous:             0 kB
7f0000000000-7f0020000000 rw-s 00000000 00:01 77                         /memfd:splitvmm-guest-ram (deleted)
Size:             524288 kB
Rss:               90000 kB
Anonymous:             0 kB
7f0030000000-7f0030100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 512 kB
Anonymous:           512 kB
VmFlags: rd wr mr mw me ac sd
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  12 kB
Anonymous:            12 kB
";

    #[test]
    fn smaps_splits_guest_ram_from_the_rest() {
        let s = parse_smaps(SMAPS, "memfd:splitvmm-guest-ram");
        assert_eq!(s.rss_kib, 800 + 90000 + 512 + 12);
        assert_eq!(s.ram_kib, 90000);
        assert_eq!(s.anon_kib, 524);
        assert_eq!(s.ram_mappings, 1);
        assert_eq!(s.overhead_kib(), 1324);
        let none = parse_smaps(SMAPS, "memfd:memory-backend-memfd");
        assert_eq!((none.ram_kib, none.ram_mappings), (0, 0));
    }

    #[test]
    fn proc_fields() {
        assert_eq!(parse_ppid("42 (qemu sys) x) S 7 42 42 0"), Some(7));
        assert_eq!(
            parse_hwm("Name:\tx\nVmHWM:\t  123456 kB\nVmRSS: 1 kB\n"),
            123456
        );
    }
}
