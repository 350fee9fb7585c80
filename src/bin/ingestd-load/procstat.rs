//! CPU and memory of processes, from `/proc` (Linux only).
//!
//! CPU is `utime + stime` in clock ticks (USER_HZ, 100 per second on every
//! mainstream Linux architecture). A process *tree* (e.g. the postmaster and
//! its backends) adds the live children's ticks to the parent's own and its
//! reaped children's (`cutime + cstime`), so backends that exit are still
//! counted. Memory: `VmRSS` and `VmHWM` of a single process; for a tree, the
//! sum of `Pss` (proportional set size, so shared buffers are not counted
//! once per backend) from `smaps_rollup`.

use std::fs;

const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One process.
    Process,
    /// A process and its direct children.
    Tree,
    /// The whole machine: busy time of every CPU, from `/proc/stat`.
    System,
}

/// A process being watched.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    pub scope: Scope,
}

impl Watched {
    /// From `NAME=PID`.
    pub fn parse(spec: &str, scope: Scope) -> Result<Self, String> {
        let (name, pid) = spec.split_once('=').ok_or_else(|| format!("expected NAME=PID, got {spec:?}"))?;
        let pid: u32 = pid.trim().parse().map_err(|_| format!("bad pid in {spec:?}"))?;
        Ok(Self { name: name.to_string(), pid, scope })
    }

    pub fn this_process(name: &str) -> Self {
        Self { name: name.to_string(), pid: std::process::id(), scope: Scope::Process }
    }

    /// Every CPU of the machine (busy = not idle and not iowait).
    pub fn machine() -> Self {
        Self { name: "machine".to_string(), pid: 0, scope: Scope::System }
    }

    /// One reading, or `None` if the process is gone.
    pub fn read(&self) -> Option<Reading> {
        if self.scope == Scope::System {
            let text = fs::read_to_string("/proc/stat").ok()?;
            let line = text.lines().next()?.strip_prefix("cpu ")?;
            let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal (guest is inside user).
            let busy = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
            return Some(Reading { ticks: busy, rss_kib: 0, hwm_kib: 0 });
        }
        let (own, children_done, _) = stat_ticks(self.pid)?;
        match self.scope {
            Scope::System => unreachable!("handled above"),
            Scope::Process => {
                let (rss, hwm) = status_mem(self.pid);
                Some(Reading { ticks: own, rss_kib: rss, hwm_kib: hwm })
            }
            Scope::Tree => {
                // A child reaped while the children are read would be counted
                // in neither place (or in both): retry until the parent's
                // reaped-children ticks did not move during the scan.
                let (mut own, mut children_done) = (own, children_done);
                let mut attempt = 0;
                loop {
                    let mut ticks = own + children_done;
                    let mut pss = pss_kib(self.pid);
                    for child in children(self.pid) {
                        if let Some((t, _, _)) = stat_ticks(child) {
                            ticks += t;
                            pss += pss_kib(child);
                        }
                    }
                    let (own_after, done_after, _) = stat_ticks(self.pid)?;
                    attempt += 1;
                    if done_after == children_done || attempt == 5 {
                        return Some(Reading { ticks, rss_kib: pss, hwm_kib: 0 });
                    }
                    (own, children_done) = (own_after, done_after);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    pub ticks: u64,
    /// RSS (process) or summed PSS (tree), KiB.
    pub rss_kib: u64,
    /// Peak RSS (process only), KiB.
    pub hwm_kib: u64,
}

/// CPU cores used between two readings `secs` apart.
pub fn cores(before: &Reading, after: &Reading, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    after.ticks.saturating_sub(before.ticks) as f64 / TICKS_PER_SEC / secs
}

/// (utime + stime, cutime + cstime, ppid) of a process.
fn stat_ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] = state (field 3), so field n is f[n - 3].
    let get = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ppid = get(4)? as u32;
    Some((get(14)? + get(15)?, get(16)? + get(17)?, ppid))
}

fn status_mem(pid: u32) -> (u64, u64) {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn pss_kib(pid: u32) -> u64 {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return status_mem(pid).0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    // /proc/PID/task/*/children lists children per thread (CONFIG_PROC_CHILDREN).
    if let Ok(tasks) = fs::read_dir(format!("/proc/{parent}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = fs::read_to_string(t.path().join("children")) {
                out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
        if !out.is_empty() {
            return out;
        }
    }
    // Fallback: scan every process for its parent.
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && stat_ticks(pid).is_some_and(|(_, _, ppid)| ppid == parent)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// Machine facts for result files: core count, CPU model, kernel, memory.
pub fn machine() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    serde_json::json!({
        "nproc": nproc,
        "cpu_model": model,
        "kernel": kernel,
        "mem_total_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let r = Watched::this_process("self").read().unwrap();
        assert!(r.rss_kib > 0);
        assert!(r.hwm_kib >= r.rss_kib);
        let tree = Watched { name: "t".into(), pid: std::process::id(), scope: Scope::Tree }.read().unwrap();
        assert!(tree.ticks >= r.ticks);
        assert!(Watched::machine().read().unwrap().ticks > 0);
        assert!(machine()["nproc"].as_u64().unwrap() >= 1);
    }
}
