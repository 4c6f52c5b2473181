//! What `brokerctl bench` reports: the result of one run, its JSON object and its table, the
//! progress line, CPU accounting from `/proc`, and latency percentiles from an HDR histogram
//! (bounded memory at any rate and duration).
//!
//! Nothing here touches the network; `bench.rs`, `relay.rs`, `many.rs` and `stream.rs` measure
//! and fill in a [`Report`].

use crate::human::{group, si};
use hdrhistogram::{CreationError, Histogram};
use serde_json::json;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 in Linux's ABI).
const USER_HZ: f64 = 100.0;

/// The result of one run.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) scenario: &'static str,
    pub(crate) size: usize,
    /// `--duration`.
    pub(crate) duration: Duration,
    /// Publishing connections: one, except in `many`.
    pub(crate) pubs: u32,
    pub(crate) subs: u32,
    pub(crate) topics: u32,
    /// Messages per second asked for: in all (latency scenario) or per publisher (`many`).
    pub(crate) rate: Option<u64>,
    pub(crate) sent: u64,
    /// Deliveries owed: `sent * subs` where every subscriber hears every message; in `many` on
    /// distinct topics, each subscriber hears one publisher.
    pub(crate) expected: u64,
    pub(crate) received: u64,
    /// Sum of the `LOST` notices the subscribers got.
    pub(crate) missed: u64,
    /// Start of publishing to the confirmation (`pub`) or to the last delivery seen.
    pub(crate) elapsed: Duration,
    /// Start of publishing to the broker's `PONG` after the last message.
    pub(crate) publish_elapsed: Duration,
    pub(crate) threads: u16,
    pub(crate) cpu: CpuShare,
    pub(crate) latency: Option<Latency>,
    /// How late the publisher handed each message over, after its slot in the schedule (the
    /// tool's own share of `latency`: timer ticks, a full write buffer, a busy runtime).
    pub(crate) send_lag: Option<Latency>,
    /// How long opening every connection took (`many`).
    pub(crate) setup: Option<Duration>,
    /// The broker's resident memory (`VmRSS`) once publishing ended, connections still open,
    /// when `--broker-pid` names it.
    pub(crate) broker_rss_kib: Option<u64>,
    /// What a stream scenario adds (`stream-pub`, `stream-replay`).
    pub(crate) stream: Option<StreamRun>,
}

/// What a stream scenario adds to a [`Report`].
#[derive(Debug, Clone)]
pub(crate) struct StreamRun {
    /// The stream written or replayed.
    pub(crate) name: String,
    /// Publishes each publisher kept unanswered at most.
    pub(crate) window: u64,
    /// Payload bytes received, when they are not all `size` bytes (a replay of messages this
    /// run did not publish).
    pub(crate) payload_bytes: Option<u64>,
}

impl Report {
    /// Deliveries that never arrived: `expected - received`.
    pub(crate) fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// The scenario's headline count: confirmed publishes for `pub`, deliveries otherwise.
    fn counted(&self) -> u64 {
        if self.subs == 0 {
            self.sent
        } else {
            self.received
        }
    }

    pub(crate) fn msgs_per_sec(&self) -> f64 {
        per_sec(self.counted(), self.elapsed)
    }

    pub(crate) fn mb_per_sec(&self) -> f64 {
        match self.stream.as_ref().and_then(|s| s.payload_bytes) {
            Some(bytes) => per_sec(bytes, self.elapsed) / 1e6,
            None => self.msgs_per_sec() * self.size as f64 / 1e6,
        }
    }

    /// Broker CPU seconds spent per million counted messages (deliveries, or confirmed
    /// publishes without subscribers). Half a core at 100,000 messages a second is 5.
    pub(crate) fn broker_cpu_s_per_million(&self) -> Option<f64> {
        let counted = self.counted();
        if counted == 0 {
            return None;
        }
        Some(self.cpu.broker_s? / (counted as f64 / 1e6))
    }

    /// The run as one JSON object.
    pub(crate) fn json(&self) -> serde_json::Value {
        let lat = self.latency.as_ref();
        json!({
            "scenario": self.scenario,
            "size": self.size,
            "duration_s": self.duration.as_secs_f64(),
            "pubs": self.pubs,
            "subs": self.subs,
            "topics": self.topics,
            "rate": self.rate,
            "sent": self.sent,
            "expected": self.expected,
            "received": self.received,
            "lost": self.lost(),
            "missed": self.missed,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "msgs_per_sec": self.msgs_per_sec().round(),
            "mb_per_sec": round2(self.mb_per_sec()),
            "publish_msgs_per_sec": per_sec(self.sent, self.publish_elapsed).round(),
            "p50_us": lat.map(|l| l.p50_us),
            "p99_us": lat.map(|l| l.p99_us),
            "p999_us": lat.map(|l| l.p999_us),
            "max_us": lat.map(|l| l.max_us),
            "send_lag_p50_us": self.send_lag.as_ref().map(|l| l.p50_us),
            "send_lag_p99_us": self.send_lag.as_ref().map(|l| l.p99_us),
            "send_lag_max_us": self.send_lag.as_ref().map(|l| l.max_us),
            "cores": cores(),
            "tool_threads": self.threads,
            "tool_cpu_pct": round2(self.cpu.tool_pct),
            "broker_cpu_pct": self.cpu.broker_pct.map(round2),
            "broker_cpu_s_per_million": self.broker_cpu_s_per_million().map(round2),
            "broker_rss_mib": self.broker_rss_kib.map(|k| round2(k as f64 / 1024.0)),
            "setup_s": self.setup.map(|d| round2(d.as_secs_f64())),
            "machine_cpu_pct": self.cpu.machine_pct.map(round2),
            "stream": self.stream.as_ref().map(|s| s.name.as_str()),
            "window": self.stream.as_ref().map(|s| s.window),
        })
    }

    /// The run as a human-readable table, one line per figure.
    pub(crate) fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "{k:<14} {v}");
        };
        let shape = match self.scenario {
            "fanout" => format!(", {} subscribers", self.subs),
            "topics" => format!(", {} topics", self.topics),
            "latency" => format!(", {} msgs/s offered", self.rate.unwrap_or(0)),
            "stream-pub" => format!(
                ", {} publisher{}, window {}, stream {}",
                group(u64::from(self.pubs)),
                if self.pubs == 1 { "" } else { "s" },
                group(self.stream.as_ref().map_or(0, |s| s.window)),
                self.stream.as_ref().map_or("?", |s| s.name.as_str())
            ),
            "stream-replay" => format!(
                ", stream {}",
                self.stream.as_ref().map_or("?", |s| s.name.as_str())
            ),
            "many" => {
                let pace = match self.rate {
                    Some(r) => format!("{r} msgs/s each"),
                    None => "unpaced".to_string(),
                };
                format!(
                    ", {} publishers ({pace}), {} subscribers, {} topic{}",
                    group(u64::from(self.pubs)),
                    group(u64::from(self.subs)),
                    group(u64::from(self.topics)),
                    if self.topics == 1 { "" } else { "s" }
                )
            }
            _ => String::new(),
        };
        row(
            "scenario",
            format!("{} ({} B payload{shape})", self.scenario, self.size),
        );
        if let Some(setup) = self.setup {
            row(
                "connections",
                format!(
                    "{} opened in {:.1} s",
                    group(u64::from(self.pubs) + u64::from(self.subs)),
                    setup.as_secs_f64()
                ),
            );
        }
        let confirmed = match self.scenario {
            "relay" => "written to the relay",
            "stream-pub" => "each confirmed by STORED",
            "stream-replay" => "stored before the replay, each confirmed by STORED",
            _ => "confirmed by PONG",
        };
        if self.scenario == "stream-replay" && self.sent == 0 {
            row("sent", "none: replaying what the stream held".to_string());
        } else {
            row(
                "sent",
                format!(
                    "{} in {:.2} s, {confirmed} ({}/s)",
                    group(self.sent),
                    self.publish_elapsed.as_secs_f64(),
                    si(per_sec(self.sent, self.publish_elapsed))
                ),
            );
        }
        if self.subs > 0 {
            row("received", group(self.received));
            row(
                "lost",
                format!(
                    "{} (broker reported {} dropped)",
                    group(self.lost()),
                    group(self.missed)
                ),
            );
        }
        let unit = if self.subs == 0 {
            "msgs/s"
        } else {
            "deliveries/s"
        };
        row(
            "rate",
            format!(
                "{} {unit}, {:.1} MB/s payload, over {:.2} s",
                si(self.msgs_per_sec()),
                self.mb_per_sec(),
                self.elapsed.as_secs_f64()
            ),
        );
        if let Some(l) = &self.latency {
            let name = if self.scenario == "stream-pub" {
                "ack (us)"
            } else {
                "latency (us)"
            };
            row(
                name,
                format!(
                    "p50 {:.1}  p99 {:.1}  p999 {:.1}  max {:.1}  ({} samples)",
                    l.p50_us,
                    l.p99_us,
                    l.p999_us,
                    l.max_us,
                    group(l.samples)
                ),
            );
        }
        if let Some(l) = &self.send_lag {
            row(
                "send lag (us)",
                format!(
                    "p50 {:.1}  p99 {:.1}  max {:.1}  (the tool's share: due to handed over)",
                    l.p50_us, l.p99_us, l.max_us
                ),
            );
        }
        row(
            "tool cpu",
            format!(
                "{:.0}% of one core ({} runtime thread{})",
                self.cpu.tool_pct,
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            ),
        );
        if let Some(b) = self.cpu.broker_pct {
            let per_million = self
                .broker_cpu_s_per_million()
                .map(|s| format!(", {s:.2} s per million messages"))
                .unwrap_or_default();
            row("broker cpu", format!("{b:.0}% of one core{per_million}"));
        }
        if let Some(kib) = self.broker_rss_kib {
            row(
                "broker memory",
                format!("{:.1} MiB resident", kib as f64 / 1024.0),
            );
        }
        if let Some(m) = self.cpu.machine_pct {
            row(
                "machine cpu",
                format!("{m:.0}% of one core, all processes ({} cores)", cores()),
            );
        }
        t
    }
}

/// The longest latency a histogram tells apart: one minute. Longer ones are recorded as this.
const MAX_LATENCY: Duration = Duration::from_secs(60);

/// Significant decimal digits a histogram keeps: values within 0.1% of each other may share a
/// bucket, for about 200 KiB per histogram whatever the number of samples.
const LATENCY_DIGITS: u8 = 3;

/// An empty latency histogram, in nanoseconds from 1 ns to [`MAX_LATENCY`].
///
/// # Errors
/// None with these bounds; the histogram crate's constructor is fallible in general.
pub(crate) fn latency_histogram() -> Result<Histogram<u64>, CreationError> {
    Histogram::new_with_bounds(1, MAX_LATENCY.as_nanos() as u64, LATENCY_DIGITS)
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
    pub(crate) samples: u64,
}

impl Latency {
    /// Percentiles of a histogram of nanoseconds (each the highest value of its bucket, so at
    /// most 0.1% above the sample's); all zero when it is empty.
    pub(crate) fn from_histogram(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| round2(ns as f64 / 1000.0);
        if h.is_empty() {
            return Latency {
                p50_us: 0.0,
                p99_us: 0.0,
                p999_us: 0.0,
                max_us: 0.0,
                samples: 0,
            };
        }
        Latency {
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            samples: h.len(),
        }
    }
}

/// CPU used over a run, as a percentage of one core (above 100 with several threads busy).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuShare {
    pub(crate) tool_pct: f64,
    pub(crate) broker_pct: Option<f64>,
    /// The broker's CPU time over the run, in seconds.
    pub(crate) broker_s: Option<f64>,
    /// Every process on the machine, this one included (from `/proc/stat`): what is left after
    /// the tool and the broker is other load competing for the same cores.
    pub(crate) machine_pct: Option<f64>,
}

/// CPU time readings taken at the start of a run.
#[derive(Debug)]
pub(crate) struct CpuClock {
    wall: Instant,
    tool: Option<u64>,
    broker_pid: Option<u32>,
    broker: Option<u64>,
    machine: Option<u64>,
}

impl CpuClock {
    /// Reads this process's (and the broker's, given its pid) CPU time now.
    pub(crate) fn start(broker_pid: Option<u32>) -> CpuClock {
        CpuClock {
            wall: Instant::now(),
            tool: cpu_ticks("self"),
            broker_pid,
            broker: broker_pid.and_then(|p| cpu_ticks(&p.to_string())),
            machine: machine_busy_ticks(),
        }
    }

    /// The CPU used since [`CpuClock::start`], per wall-clock second. A process whose `/proc`
    /// entry cannot be read reports 0 (tool) or nothing (broker).
    pub(crate) fn stop(self) -> CpuShare {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let seconds = |before: Option<u64>, after: Option<u64>| -> Option<f64> {
            let used = after?.checked_sub(before?)?;
            Some(used as f64 / USER_HZ)
        };
        let share = |s: Option<f64>| s.map(|s| s / wall * 100.0);
        let broker_s = self
            .broker_pid
            .and_then(|p| seconds(self.broker, cpu_ticks(&p.to_string())));
        CpuShare {
            tool_pct: share(seconds(self.tool, cpu_ticks("self"))).unwrap_or(0.0),
            broker_pct: share(broker_s),
            broker_s,
            machine_pct: share(seconds(self.machine, machine_busy_ticks())),
        }
    }
}

/// Busy time of all CPUs together from the first line of `/proc/stat`, in clock ticks: every
/// field except `idle` and `iowait` (`guest` time is already inside `user`, so it is skipped).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(stat.lines().next()?)
}

/// The busy ticks of the aggregate `cpu` line of `/proc/stat`; `None` for any other line.
fn parse_machine_busy(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

/// User plus system time of `/proc/<pid>/stat`, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// Fields 14 (`utime`) and 15 (`stime`) of a `/proc/<pid>/stat` line. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted from its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The resident memory of process `pid` in KiB, from the `VmRSS` line of `/proc/<pid>/status`.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// The value of the `VmRSS:` line of a `/proc/<pid>/status` text (always in kB there).
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Returns to the start of the line and clears it (`CR`, then `ESC [2K`), so a shorter line
/// leaves nothing of a longer one behind.
const CLEAR_LINE: &str = "\r\x1b[2K";

/// Rewrites the progress line on stderr (which the caller has found to be a terminal). Rates
/// are per second over the interval since the previous line, however long it actually was.
pub(crate) fn show_progress(
    elapsed: Duration,
    sent: u64,
    sent_rate: f64,
    received: Option<(u64, f64)>,
) {
    let line = progress_line(elapsed, sent, sent_rate, received);
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}

/// The progress line, starting with [`CLEAR_LINE`] and without a newline.
fn progress_line(
    elapsed: Duration,
    sent: u64,
    sent_rate: f64,
    received: Option<(u64, f64)>,
) -> String {
    let mut line = format!(
        "{CLEAR_LINE}{:>4.0}s  sent {} ({}/s)",
        elapsed.as_secs_f64(),
        group(sent),
        si(sent_rate)
    );
    if let Some((total, rate)) = received {
        let _ = write!(line, "  received {} ({}/s)", group(total), si(rate));
    }
    line
}

/// Clears the progress line, so that what follows starts on a clean line.
pub(crate) fn clear_progress() {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(CLEAR_LINE.as_bytes());
    let _ = err.flush();
}

/// Cores available to this process.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `n` per second over `d` (a `d` of zero counts as a nanosecond).
pub(crate) fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// `x` rounded to two decimals.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream scenario's report with these figures.
    fn stream_report(scenario: &'static str, sent: u64, received: u64) -> Report {
        Report {
            scenario,
            size: 128,
            duration: Duration::from_secs(5),
            pubs: 2,
            subs: u32::from(scenario == "stream-replay"),
            topics: 2,
            rate: None,
            sent,
            expected: 1_000,
            received,
            missed: 0,
            elapsed: Duration::from_secs(2),
            publish_elapsed: Duration::from_secs(2),
            threads: 1,
            cpu: CpuShare {
                tool_pct: 50.0,
                broker_pct: None,
                broker_s: None,
                machine_pct: None,
            },
            latency: (scenario == "stream-pub").then_some(Latency {
                p50_us: 80.0,
                p99_us: 300.0,
                p999_us: 900.0,
                max_us: 1_000.0,
                samples: sent,
            }),
            send_lag: None,
            setup: None,
            broker_rss_kib: None,
            stream: Some(StreamRun {
                name: "BENCH".into(),
                window: 1_000,
                payload_bytes: (scenario == "stream-replay").then_some(4_000_000),
            }),
        }
    }

    #[test]
    fn stream_scenarios_say_what_was_stored_and_replayed() {
        let r = stream_report("stream-pub", 400_000, 0);
        let t = r.table();
        assert!(
            t.contains("stream-pub (128 B payload, 2 publishers, window 1,000, stream BENCH)"),
            "{t}"
        );
        assert!(
            t.contains("400,000 in 2.00 s, each confirmed by STORED"),
            "{t}"
        );
        assert!(t.contains("ack (us)       p50 80.0  p99 300.0"), "{t}");
        assert!(t.contains("200.0 k msgs/s"), "{t}");
        assert_eq!(r.json()["window"], 1_000);
        assert_eq!(r.json()["stream"], "BENCH");
        // A replay of what the stream held: MB/s from the bytes received, not the --size.
        let r = stream_report("stream-replay", 0, 1_000);
        let t = r.table();
        assert!(t.contains("none: replaying what the stream held"), "{t}");
        assert!(t.contains("500 deliveries/s, 2.0 MB/s payload"), "{t}");
    }

    #[test]
    fn stat_fields_after_a_command_with_spaces() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194304 100 0 0 0 250 30 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(280));
    }

    #[test]
    fn machine_busy_skips_idle_and_iowait() {
        let line = "cpu  100 2 30 5000 7 1 4 9 0 0";
        assert_eq!(parse_machine_busy(line), Some(146));
        assert_eq!(parse_machine_busy("cpu0 1 2 3"), None);
    }

    #[test]
    fn the_progress_line_clears_what_was_there() {
        let line = progress_line(
            Duration::from_secs(3),
            1_500_000,
            499_800.0,
            Some((12, 4.0)),
        );
        assert_eq!(
            line,
            "\r\x1b[2K   3s  sent 1,500,000 (499.8 k/s)  received 12 (4/s)"
        );
        assert!(!line.ends_with(' '));
    }

    #[test]
    fn own_cpu_is_readable() {
        assert!(cpu_ticks("self").is_some());
    }

    #[test]
    fn resident_memory_from_the_status_file() {
        let status = "Name:\tbrokerd\nVmHWM:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    /// Whether `got` is within the histogram's 0.1% of `want`.
    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= want * 0.001 + 0.01
    }

    #[test]
    fn percentiles_from_the_histogram() {
        let mut h = latency_histogram().unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert!(close(l.p50_us, 500.0), "{l:?}");
        assert!(close(l.p99_us, 990.0), "{l:?}");
        assert!(close(l.p999_us, 999.0), "{l:?}");
        assert!(close(l.max_us, 1000.0), "{l:?}");
        assert_eq!(l.samples, 1000);
    }

    #[test]
    fn an_empty_histogram_reports_zeros() {
        let l = Latency::from_histogram(&latency_histogram().unwrap());
        assert_eq!((l.p50_us, l.max_us, l.samples), (0.0, 0.0, 0));
    }

    #[test]
    fn a_latency_past_the_bound_is_kept_as_the_bound() {
        let mut h = latency_histogram().unwrap();
        h.saturating_record(10 * MAX_LATENCY.as_nanos() as u64);
        h.saturating_record(0);
        let l = Latency::from_histogram(&h);
        assert_eq!(l.samples, 2);
        assert!(close(l.max_us, MAX_LATENCY.as_micros() as f64), "{l:?}");
    }

    #[test]
    fn a_million_samples_take_no_more_room_than_one() {
        let mut h = latency_histogram().unwrap();
        h.record(1).unwrap();
        let (buckets, one) = (h.distinct_values(), h.clone());
        for ns in 0..1_000_000u64 {
            h.saturating_record(ns * 60_000);
        }
        assert_eq!(h.distinct_values(), buckets);
        assert_eq!(h.len(), one.len() + 1_000_000);
    }
}
