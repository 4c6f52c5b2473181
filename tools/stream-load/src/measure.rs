//! What the tool measures besides counting: a latency histogram, CPU time (its own, the broker's,
//! the whole machine's) from `/proc`, the broker's memory from `/proc/PID/status`, and the one
//! JSON line every mode prints. Linux only, std only; nothing here touches a socket.

use std::fmt::Write as _;
use std::fs;

/// A log-linear histogram of nanosecond values: 64 sub-buckets per power of two, so any value is
/// reported within 1.6% (the bucket's midpoint). Fixed size (about 30 KiB) whatever the count.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; ((64 - SUB_BITS + 1) as usize) * SUB as usize],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // e >= SUB_BITS
        let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
        ((e - SUB_BITS + 1) as usize) * SUB as usize + sub as usize
    }

    fn midpoint(i: usize) -> u64 {
        if i < SUB as usize {
            return i as u64;
        }
        let e = (i / SUB as usize) as u32 + SUB_BITS - 1;
        let sub = (i % SUB as usize) as u64;
        let low = (SUB + sub) << (e - SUB_BITS);
        low + (1u64 << (e - SUB_BITS)) / 2
    }

    /// Counts one value.
    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The largest value counted, exactly.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), or 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::midpoint(i).min(self.max);
            }
        }
        self.max
    }
}

unsafe extern "C" {
    // From the C library std already links; _SC_CLK_TCK is 2 on Linux.
    fn sysconf(name: i32) -> i64;
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the C library; it has no preconditions.
    let t = unsafe { sysconf(2) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User plus system CPU ticks of a process (`self` or a pid), from `/proc/<pid>/stat`.
fn proc_ticks(pid: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // After ')' the first field is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Busy, stolen and total ticks of the whole machine, from the first line of `/proc/stat`.
/// Busy leaves out idle, iowait and steal (time the hypervisor gave to other guests).
fn machine_ticks() -> Option<(u64, u64, u64)> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let (idle, steal) = (at(3) + at(4), at(7));
    Some((total.saturating_sub(idle + steal), steal, total))
}

/// CPU counters at one moment; two of them give the shares over the interval between.
#[derive(Clone, Copy)]
pub struct CpuSample {
    tool: Option<u64>,
    broker: Option<u64>,
    machine: Option<(u64, u64, u64)>,
    at: std::time::Instant,
}

impl CpuSample {
    /// Reads the counters now; `broker` is the broker's pid, if known.
    pub fn now(broker: Option<u32>) -> CpuSample {
        CpuSample {
            tool: proc_ticks("self"),
            broker: broker.and_then(|p| proc_ticks(&p.to_string())),
            machine: machine_ticks(),
            at: std::time::Instant::now(),
        }
    }

    /// CPU used from `self` to `later`, in percent of one core: (tool, broker, machine, steal);
    /// the machine's shares are of all its cores together (200 = both cores busy on this
    /// machine), and include kernel threads (writeback, the file system's journal) that no
    /// process is charged for.
    pub fn shares(&self, later: &CpuSample) -> Shares {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let hz = ticks_per_second();
        let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / hz / secs * 100.0),
            _ => None,
        };
        let (machine, steal) = match (self.machine, later.machine) {
            (Some((b0, s0, t0)), Some((b1, s1, t1))) if t1 > t0 => {
                let cores = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1) as f64;
                let share = |a: u64, b: u64| {
                    Some(b.saturating_sub(a) as f64 / (t1 - t0) as f64 * cores * 100.0)
                };
                (share(b0, b1), share(s0, s1))
            }
            _ => (None, None),
        };
        Shares {
            tool: pct(self.tool, later.tool),
            broker: pct(self.broker, later.broker),
            machine,
            steal,
        }
    }
}

/// CPU shares over an interval, in percent of one core; `None` where unknown.
#[derive(Clone, Copy, Default)]
pub struct Shares {
    /// This tool, all its threads.
    pub tool: Option<f64>,
    /// The broker process, if its pid was given.
    pub broker: Option<f64>,
    /// The whole machine, all cores, busy (idle, iowait and steal left out).
    pub machine: Option<f64>,
    /// Time stolen by the hypervisor, all cores.
    pub steal: Option<f64>,
}

/// A process's resident memory now and at its peak (`VmRSS`, `VmHWM`), in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l[name.len()..].split_ascii_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets a process's peak resident size (`VmHWM`) to its current size, so the peak read later
/// covers only what happened in between. Needs the right to write `/proc/PID/clear_refs`.
pub fn reset_peak_rss(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// One flat JSON object, built field by field in order.
pub struct Json(String);

impl Json {
    /// An object with no fields yet.
    pub fn new() -> Json {
        Json(String::from("{"))
    }

    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "\"{k}\":");
    }

    /// A string field (escaped).
    pub fn str(&mut self, k: &str, v: &str) -> &mut Json {
        self.key(k);
        self.0.push('"');
        for c in v.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        self.0.push('"');
        self
    }

    /// An integer field.
    pub fn int(&mut self, k: &str, v: u64) -> &mut Json {
        self.key(k);
        let _ = write!(self.0, "{v}");
        self
    }

    /// A number field, rounded to `digits` decimals.
    pub fn num(&mut self, k: &str, v: f64, digits: usize) -> &mut Json {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.0, "{v:.digits$}");
        } else {
            self.0.push_str("null");
        }
        self
    }

    /// A number field, or `null` when absent.
    pub fn opt(&mut self, k: &str, v: Option<f64>, digits: usize) -> &mut Json {
        match v {
            Some(v) => self.num(k, v, digits),
            None => {
                self.key(k);
                self.0.push_str("null");
                self
            }
        }
    }

    /// A boolean field.
    pub fn bool(&mut self, k: &str, v: bool) -> &mut Json {
        self.key(k);
        self.0.push_str(if v { "true" } else { "false" });
        self
    }

    /// The finished object.
    pub fn finish(&mut self) -> String {
        let mut s = std::mem::take(&mut self.0);
        s.push('}');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_two_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 50_000_000.0),
            (0.99, 99_000_000.0),
            (1.0, 100_000_000.0),
        ] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q {q}: {got} vs {want}");
        }
        assert_eq!(h.total, 100_000);
        assert_eq!(h.max(), 100_000_000);
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1 << 40, u64::MAX >> 1] {
            let m = Histogram::midpoint(Histogram::index(v));
            assert!(m.abs_diff(v) as f64 <= v as f64 / 60.0 + 1.0, "{v} -> {m}");
        }
    }

    #[test]
    fn self_cpu_and_json_are_readable() {
        assert!(proc_ticks("self").is_some());
        assert!(machine_ticks().is_some());
        let s = Json::new()
            .str("a", "x\"y")
            .int("n", 3)
            .num("f", 1.25, 1)
            .opt("z", None, 0)
            .bool("b", true)
            .finish();
        assert_eq!(s, r#"{"a":"x\"y","n":3,"f":1.2,"z":null,"b":true}"#);
    }
}
