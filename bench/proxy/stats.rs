//! Percentiles and /proc readings: the only arithmetic the report relies on, kept pure where it can be.

use std::collections::HashMap;
use std::fs;

/// Latency distribution in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub p50: f64,
    pub p99: f64,
}

/// Nearest-rank percentiles; `None` when there is no sample (the report then prints a dash, never a zero).
pub fn summarize(mut samples: Vec<f64>) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    Some(Summary {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
    })
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The process listening on a TCP port of this network namespace, found through the socket's inode,
/// so that a peer which forks or daemonizes (uvicorn, `ccr start`) is still measured in the right process.
pub fn listener_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .find_map(|table| listening_inode(&table, port))?;
    let wanted = format!("socket:[{inode}]");
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == wanted) {
                return Some(pid);
            }
        }
    }
    None
}

/// Parses /proc/net/tcp: `sl local_address rem_address st ... inode`, state 0A = LISTEN.
fn listening_inode(table: &str, port: u16) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let local_port = cols.get(1)?.rsplit(':').next()?;
        (u16::from_str_radix(local_port, 16).ok()? == port && *cols.get(3)? == "0A")
            .then(|| cols.get(9)?.parse().ok())
            .flatten()
    })
}

/// `pid` and all its descendants: a peer's workers count towards its cost.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = fs::read_to_string(entry.path().join("stat")).ok()
                && let Some(ppid) = stat_fields(&stat).and_then(|f| f.get(1)?.parse().ok())
            {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// Fields of /proc/<pid>/stat after the `(comm)` (which may hold spaces): [0] = state, [1] = ppid, ...
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// utime + stime of the processes, in clock ticks.
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let f = stat_fields(&s)?;
            // utime and stime are stat fields 14 and 15, i.e. 11 and 12 after the comm.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Sum of a /proc/<pid>/status memory line (VmRSS, VmHWM) over the processes, in KiB.
pub fn status_kib(pids: &[u32], key: &str) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            let line = s.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = summarize((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((s.p50, s.p99), (50.0, 99.0));
        assert!(summarize(vec![]).is_none());
        assert_eq!(summarize(vec![7.0]).unwrap().p99, 7.0);
    }

    #[test]
    fn finds_a_listening_socket_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:47E4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1\n   1: 0100007F:47E5 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 999 1";
        assert_eq!(listening_inode(table, 0x47E4), Some(12345));
        assert_eq!(
            listening_inode(table, 0x47E5),
            None,
            "an established socket is not a listener"
        );
    }

    #[test]
    fn stat_fields_survive_spaces_in_comm() {
        let f = stat_fields("42 (node (v20) x) S 7 42 42 0 -1 0 1 2 3 4 150 25 0 0").unwrap();
        assert_eq!(f[1], "7");
        assert_eq!((f[11], f[12]), ("150", "25"));
    }
}
