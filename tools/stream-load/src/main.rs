//! `stream-load`: one load tool for durable streams that speaks brokerd's binary protocol and
//! the NATS protocol with JetStream the same way (blocking sockets, one thread per connection,
//! publishes coalesced into large writes, the same window and payloads), so the two brokers are
//! measured side by side by the same client. Std only.
//!
//! Layout:
//! - `main.rs`: command line, the modes, the JSON report.
//! - `load.rs`: receive buffer and the windowed publish loop, protocol-independent.
//! - `brokerd.rs`: brokerd's frames, stream requests, `STORED`, replay subscriptions.
//! - `nats.rs`: the NATS text protocol, JetStream API requests, PubAcks, ordered push consumer.
//! - `measure.rs`: latency histogram, CPU and memory from `/proc`, JSON building.
//! - `sink.rs`: a stand-in broker that answers instantly, to measure the tool's own ceiling.
//! - `probe.rs`: the disk's append + fdatasync latency.
//! - `summary.rs`: medians and ranges of many runs' JSON lines, as Markdown tables.
//!
//! Usage: `stream-load --help`.

mod brokerd;
mod load;
mod measure;
mod nats;
mod probe;
mod sink;
mod summary;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use load::{Conn, Outcome, Plan, publish_loop};
use measure::{CpuSample, Histogram, Json};

const USAGE: &str = "\
stream-load: stored publish and replay against brokerd or NATS JetStream

  stream-load pub    --target brokerd|nats --addr HOST:PORT [options]
  stream-load replay --target brokerd|nats --addr HOST:PORT --count N [options]
  stream-load fsync-probe [--dir DIR] [--count 1000] [--size 4096]
  stream-load sink   --target brokerd|nats --listen HOST:PORT [--max-secs 600]
  stream-load ready  --target brokerd|nats --addr HOST:PORT [--timeout 10]
  stream-load summarize < runs.jsonl

Options:
  --publishers P     publishing connections, each its own thread (default 1)
  --window W         unacknowledged publishes per connection (default 1000; 1 = one at a time)
  --size S           payload bytes (default 128)
  --duration SECS    pub: publish for this long (default 5)
  --count N          pub: stop after N publishes; replay: messages to fill and replay
  --fsync MODE       brokerd's stream setting: interval|always|never (default interval);
                     JetStream 2.9 has none per stream (it syncs on its own timer)
  --broker-pid PID   report the broker's CPU share (and, for replay, its RSS)
  --skip-fill        replay: the stream exists already (give --stream and --filter)
  --stream NAME      the stream's name (default a fresh LOAD_<tag>)
  --filter F         replay with --skip-fill: the stream's subject filter
  --keep             do not delete the stream at the end
  --timeout SECS     replay: give up after this long (default 300)
  --label TEXT       copied into the JSON line

Every run prints one JSON line on stdout; diagnostics go to stderr.
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Brokerd,
    Nats,
}

#[derive(Clone, Debug)]
struct Opts {
    mode: String,
    target: Target,
    addr: String,
    listen: String,
    publishers: u32,
    window: u32,
    size: usize,
    duration: Duration,
    count: Option<u64>,
    fsync: String,
    broker_pid: Option<u32>,
    skip_fill: bool,
    stream: Option<String>,
    filter: Option<String>,
    keep: bool,
    timeout: Duration,
    label: String,
    dir: String,
    max_secs: u64,
}

fn secs(v: &str) -> Result<Duration, String> {
    let t = v.trim_end_matches('s');
    t.parse::<f64>()
        .ok()
        .filter(|s| *s >= 0.0 && s.is_finite())
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("not a number of seconds: {v}"))
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        mode: String::new(),
        target: Target::Brokerd,
        addr: String::new(),
        listen: String::new(),
        publishers: 1,
        window: 1000,
        size: 128,
        duration: Duration::from_secs(5),
        count: None,
        fsync: "interval".into(),
        broker_pid: None,
        skip_fill: false,
        stream: None,
        filter: None,
        keep: false,
        timeout: Duration::from_secs(300),
        label: String::new(),
        dir: ".".into(),
        max_secs: 600,
    };
    let mut it = args.iter();
    o.mode = it.next().ok_or("a mode is required")?.clone();
    if o.mode == "-h" || o.mode == "--help" || o.mode == "help" {
        return Err(String::new());
    }
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        let num = |v: String| {
            v.replace('_', "")
                .parse::<u64>()
                .map_err(|_| format!("{a}: not a number: {v}"))
        };
        match a.as_str() {
            "--target" => {
                o.target = match val()?.as_str() {
                    "brokerd" => Target::Brokerd,
                    "nats" | "jetstream" => Target::Nats,
                    t => return Err(format!("unknown target {t}")),
                }
            }
            "--addr" => o.addr = val()?,
            "--listen" => o.listen = val()?,
            "--publishers" => o.publishers = num(val()?)?.max(1) as u32,
            "--window" => o.window = num(val()?)?.clamp(1, 1 << 20) as u32,
            "--size" => o.size = num(val()?)? as usize,
            "--duration" => o.duration = secs(&val()?)?,
            "--count" => o.count = Some(num(val()?)?),
            "--fsync" => {
                o.fsync = val()?;
                if !["interval", "always", "never"].contains(&o.fsync.as_str()) {
                    return Err(format!(
                        "--fsync: interval, always or never, not {}",
                        o.fsync
                    ));
                }
            }
            "--broker-pid" => o.broker_pid = Some(num(val()?)? as u32),
            "--skip-fill" => o.skip_fill = true,
            "--stream" => o.stream = Some(val()?),
            "--filter" => o.filter = Some(val()?),
            "--keep" => o.keep = true,
            "--timeout" => o.timeout = secs(&val()?)?,
            "--label" => o.label = val()?,
            "--dir" => o.dir = val()?,
            "--max-secs" => o.max_secs = num(val()?)?,
            "-h" | "--help" => return Err(String::new()),
            a => return Err(format!("unknown option {a}")),
        }
    }
    Ok(o)
}

/// A suffix that differs between runs of the tool: the low bits of the wall clock in ns.
pub fn unique_suffix() -> String {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}", (ns as u64) & 0xffff_ffff_ffff)
}

/// The names one run uses: a fresh stream capturing a subject of its own.
struct Names {
    tag: String,
    stream: String,
    filter: String,
    topic: String,
}

impl Names {
    fn new(o: &Opts) -> Names {
        let tag = format!("t{}", unique_suffix());
        let stream = o.stream.clone().unwrap_or_else(|| format!("LOAD_{tag}"));
        let filter = o.filter.clone().unwrap_or_else(|| format!("load.{tag}.>"));
        let topic = match filter.strip_suffix(".>") {
            Some(base) => format!("{base}.x"),
            None => filter.clone(),
        };
        Names {
            tag,
            stream,
            filter,
            topic,
        }
    }
}

fn create_stream(o: &Opts, n: &Names) -> Result<(), String> {
    match o.target {
        Target::Brokerd => {
            let json = format!(
                "{{\"name\":\"{}\",\"filters\":[\"{}\"],\"fsync\":\"{}\"}}",
                n.stream, n.filter, o.fsync
            );
            let answer = brokerd::request(&o.addr, "add", &json)?;
            if answer.contains("\"error\"") {
                return Err(format!("stream add: {answer}"));
            }
        }
        Target::Nats => {
            let json = format!(
                "{{\"name\":\"{}\",\"subjects\":[\"{}\"],\"storage\":\"file\",\
                 \"retention\":\"limits\",\"discard\":\"old\",\"num_replicas\":1}}",
                n.stream, n.filter
            );
            nats::request(&o.addr, &format!("STREAM.CREATE.{}", n.stream), &json)?;
        }
    }
    Ok(())
}

fn delete_stream(o: &Opts, n: &Names) {
    let r = match o.target {
        Target::Brokerd => {
            brokerd::request(&o.addr, "delete", &format!("{{\"name\":\"{}\"}}", n.stream)).and_then(
                |a| {
                    if a.contains("\"error\"") {
                        Err(a)
                    } else {
                        Ok(())
                    }
                },
            )
        }
        Target::Nats => {
            nats::request(&o.addr, &format!("STREAM.DELETE.{}", n.stream), "").map(|_| ())
        }
    };
    if let Err(e) = r {
        eprintln!("stream-load: deleting stream {}: {e}", n.stream);
    }
}

/// What all publishing connections of one phase did together.
struct Phase {
    sent: u64,
    stored: u64,
    refused: u64,
    unanswered: u64,
    writes: u64,
    latency: Histogram,
    elapsed: Duration,
    refusal: Option<String>,
    cpu: measure::Shares,
}

fn publisher_thread(
    o: &Opts,
    n: &Names,
    index: u32,
    plan: Plan,
    barrier: &Barrier,
) -> Result<Outcome, String> {
    let payload = vec![b'x'; o.size];
    let setup = match o.target {
        Target::Brokerd => brokerd::connect(&o.addr, "stream-load-pub"),
        Target::Nats => nats_publisher_conn(o, &format!("_INBOX.{}.p{index}", n.tag)),
    };
    barrier.wait();
    let mut conn = setup?;
    let start = Instant::now();
    match o.target {
        Target::Brokerd => {
            let mut p = brokerd::BrokerdPublisher::new(&n.topic, &payload);
            publish_loop(&mut conn, &mut p, &plan, start)
        }
        Target::Nats => {
            let inbox = format!("_INBOX.{}.p{index}", n.tag);
            let mut p = nats::NatsPublisher::new(&n.topic, &inbox, &payload);
            publish_loop(&mut conn, &mut p, &plan, start)
        }
    }
}

fn nats_publisher_conn(o: &Opts, inbox: &str) -> Result<Conn, String> {
    use std::io::Write;
    let mut conn = nats::connect(&o.addr, "stream-load-pub")?;
    conn.sock
        .write_all(nats::NatsPublisher::subscribe_line(inbox).as_bytes())
        .map_err(|e| format!("SUB: {e}"))?;
    // The PONG after the SUB: the subscription is in place before the first publish.
    conn.read_until(Duration::from_secs(30), "SUB", |buf, ctl| {
        let mut used = 0;
        while let Some((ev, k)) = nats::next_event(&buf[used..])? {
            used += k;
            match ev {
                nats::Event::Pong => return Ok((used, Some(()))),
                nats::Event::Ping => ctl.extend_from_slice(b"PONG\r\n"),
                nats::Event::Err(e) => {
                    return Err(format!("SUB: -ERR{}", String::from_utf8_lossy(e)));
                }
                _ => {}
            }
        }
        Ok((used, None))
    })?;
    Ok(conn)
}

fn publish_phase(
    o: &Opts,
    n: &Names,
    count: Option<u64>,
    duration: Option<Duration>,
) -> Result<Phase, String> {
    let p = o.publishers;
    let barrier = Arc::new(Barrier::new(p as usize + 1));
    let mut handles = Vec::new();
    for i in 0..p {
        let share = count.map(|c| c / p as u64 + u64::from(i == 0) * (c % p as u64));
        let plan = Plan {
            window: o.window,
            count: share,
            duration,
            drain: Duration::from_secs(15),
        };
        let (o, b) = (o.clone(), barrier.clone());
        let names = Names {
            tag: n.tag.clone(),
            stream: n.stream.clone(),
            filter: n.filter.clone(),
            topic: n.topic.clone(),
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("pub-{i}"))
                .spawn(move || publisher_thread(&o, &names, i, plan, &b))
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    barrier.wait();
    let start = Instant::now();
    let cpu0 = CpuSample::now(o.broker_pid);
    let mut ph = Phase {
        sent: 0,
        stored: 0,
        refused: 0,
        unanswered: 0,
        writes: 0,
        latency: Histogram::new(),
        elapsed: Duration::ZERO,
        refusal: None,
        cpu: measure::Shares::default(),
    };
    let mut end = start;
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(out)) => {
                ph.sent += out.sent;
                ph.stored += out.stored;
                ph.refused += out.refused;
                ph.unanswered += out.unanswered;
                ph.writes += out.writes;
                ph.latency.merge(&out.latency);
                end = end.max(out.end);
                if ph.refusal.is_none() {
                    ph.refusal = out.refusal;
                }
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("a publisher thread panicked".to_string());
            }
        }
    }
    let cpu1 = CpuSample::now(o.broker_pid);
    ph.cpu = cpu0.shares(&cpu1);
    if let Some(e) = first_err {
        return Err(e);
    }
    ph.elapsed = end.duration_since(start);
    Ok(ph)
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Brokerd => "brokerd",
        Target::Nats => "nats",
    }
}

fn fsync_name(o: &Opts) -> &str {
    match o.target {
        Target::Brokerd => &o.fsync,
        Target::Nats => "js-default",
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn run_pub(o: &Opts) -> Result<String, String> {
    let n = Names::new(o);
    create_stream(o, &n)?;
    let duration = if o.count.is_some() {
        None
    } else {
        Some(o.duration)
    };
    let ph = publish_phase(o, &n, o.count, duration);
    if !o.keep {
        delete_stream(o, &n);
    }
    let ph = ph?;
    let secs = ph.elapsed.as_secs_f64().max(1e-9);
    let h = &ph.latency;
    Ok(Json::new()
        .str("tool", "stream-load")
        .str("mode", "pub")
        .str("target", target_name(o.target))
        .str("fsync", fsync_name(o))
        .int("size", o.size as u64)
        .int("window", o.window as u64)
        .int("publishers", o.publishers as u64)
        .num("secs", secs, 3)
        .int("sent", ph.sent)
        .int("stored", ph.stored)
        .int("refused", ph.refused)
        .int("unanswered", ph.unanswered)
        .num("msgs_per_s", ph.stored as f64 / secs, 0)
        .num("mb_per_s", ph.stored as f64 * o.size as f64 / secs / 1e6, 2)
        .num("ack_p50_us", us(h.quantile(0.50)), 1)
        .num("ack_p90_us", us(h.quantile(0.90)), 1)
        .num("ack_p99_us", us(h.quantile(0.99)), 1)
        .num("ack_p999_us", us(h.quantile(0.999)), 1)
        .num("ack_max_us", us(h.max()), 1)
        .num(
            "pubs_per_write",
            ph.sent as f64 / ph.writes.max(1) as f64,
            1,
        )
        .opt("tool_cpu_pct", ph.cpu.tool, 1)
        .opt("broker_cpu_pct", ph.cpu.broker, 1)
        .opt("machine_cpu_pct", ph.cpu.machine, 1)
        .opt("steal_pct", ph.cpu.steal, 1)
        .str("refusal", ph.refusal.as_deref().unwrap_or(""))
        .str("label", &o.label)
        .finish())
}

fn run_replay(o: &Opts) -> Result<String, String> {
    let count = o.count.ok_or("replay needs --count")?;
    if o.skip_fill && (o.stream.is_none() || (o.target == Target::Brokerd && o.filter.is_none())) {
        return Err("--skip-fill needs --stream (and --filter for brokerd)".into());
    }
    let n = Names::new(o);
    let mut fill = None;
    if !o.skip_fill {
        create_stream(o, &n)?;
        let ph = publish_phase(o, &n, Some(count), None);
        match ph {
            Ok(ph) if ph.stored == count => fill = Some(ph),
            Ok(ph) => {
                if !o.keep {
                    delete_stream(o, &n);
                }
                return Err(format!(
                    "fill stored {} of {count} ({})",
                    ph.stored,
                    ph.refusal.unwrap_or_default()
                ));
            }
            Err(e) => {
                if !o.keep {
                    delete_stream(o, &n);
                }
                return Err(e);
            }
        }
    }
    let rss_before = o.broker_pid.and_then(measure::rss_kib);
    let peak_reset = o.broker_pid.is_some_and(measure::reset_peak_rss);
    let cpu0 = CpuSample::now(o.broker_pid);
    let replayed = match o.target {
        Target::Brokerd => brokerd::replay(&o.addr, &n.stream, &n.filter, count, o.timeout),
        Target::Nats => nats::replay(&o.addr, &n.stream, count, o.timeout),
    };
    let cpu1 = CpuSample::now(o.broker_pid);
    let rss_after = o.broker_pid.and_then(measure::rss_kib);
    if !o.keep && !o.skip_fill {
        delete_stream(o, &n);
    }
    let r = replayed?;
    let cpu = cpu0.shares(&cpu1);
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let mut j = Json::new();
    j.str("tool", "stream-load")
        .str("mode", "replay")
        .str("target", target_name(o.target))
        .str("fsync", fsync_name(o))
        .int("size", o.size as u64)
        .int("count", count)
        .int("received", r.msgs)
        .int("last_seq", r.last_seq)
        .int("gaps", r.gaps)
        .num("secs", secs, 3)
        .num("msgs_per_s", r.msgs as f64 / secs, 0)
        .num("mb_per_s", r.bytes as f64 / secs / 1e6, 2)
        .opt("first_msg_ms", r.first.map(|d| d.as_secs_f64() * 1e3), 2)
        .num("msgs_per_read", r.msgs as f64 / r.reads.max(1) as f64, 1)
        .int("flow_controls", r.flow_controls)
        .int("heartbeats", r.heartbeats)
        .opt("tool_cpu_pct", cpu.tool, 1)
        .opt("broker_cpu_pct", cpu.broker, 1)
        .opt("machine_cpu_pct", cpu.machine, 1)
        .opt("steal_pct", cpu.steal, 1);
    if let Some((rss, _)) = rss_before {
        j.num("broker_rss_before_mib", rss as f64 / 1024.0, 1);
    }
    if let Some((rss, hwm)) = rss_after {
        j.num("broker_rss_after_mib", rss as f64 / 1024.0, 1)
            .num("broker_peak_rss_mib", hwm as f64 / 1024.0, 1)
            .bool("peak_is_replay_only", peak_reset);
    }
    if let Some(f) = fill {
        let fs = f.elapsed.as_secs_f64().max(1e-9);
        j.num("fill_msgs_per_s", f.stored as f64 / fs, 0)
            .num("fill_secs", fs, 3)
            .opt("fill_tool_cpu_pct", f.cpu.tool, 1)
            .opt("fill_broker_cpu_pct", f.cpu.broker, 1);
    }
    Ok(j.str("label", &o.label).finish())
}

/// Waits until the broker completes a handshake, for at most `--timeout` (10 s unless given).
fn ready(o: &Opts) -> Result<String, String> {
    let limit = if std::env::args().any(|a| a == "--timeout") {
        o.timeout
    } else {
        Duration::from_secs(10)
    };
    let until = Instant::now() + limit;
    loop {
        let r = match o.target {
            Target::Brokerd => brokerd::connect(&o.addr, "stream-load-ready").map(|_| ()),
            Target::Nats => nats::connect(&o.addr, "stream-load-ready").map(|_| ()),
        };
        match r {
            Ok(()) => {
                return Ok(format!(
                    "{{\"tool\":\"stream-load\",\"mode\":\"ready\",\"target\":\"{}\"}}",
                    target_name(o.target)
                ));
            }
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            if e.is_empty() {
                print!("{USAGE}");
                return;
            }
            eprintln!("stream-load: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let needs_addr = matches!(o.mode.as_str(), "pub" | "replay" | "ready");
    if needs_addr && o.addr.is_empty() {
        eprintln!("stream-load: {} needs --addr", o.mode);
        std::process::exit(2);
    }
    let result = match o.mode.as_str() {
        "pub" => run_pub(&o),
        "replay" => run_replay(&o),
        "fsync-probe" => {
            probe::fsync_probe(&o.dir, o.count.unwrap_or(1000), o.size_or(4096), &o.label)
        }
        "ready" => ready(&o),
        "summarize" => summary::run(),
        "sink" => sink::run(
            o.target == Target::Nats,
            &o.listen,
            Duration::from_secs(o.max_secs),
        ),
        m => Err(format!("unknown mode {m}")),
    };
    match result {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("stream-load {}: {e}", o.mode);
            std::process::exit(1);
        }
    }
}

impl Opts {
    /// The payload size, or `default` when `--size` was not given.
    fn size_or(&self, default: usize) -> usize {
        if std::env::args().any(|a| a == "--size") {
            self.size
        } else {
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let a: Vec<String> = "pub --target nats --addr 127.0.0.1:1 --window 1 --size 1024 --duration 2s --fsync always"
            .split(' ')
            .map(String::from)
            .collect();
        let o = parse_args(&a).unwrap();
        assert_eq!(o.target, Target::Nats);
        assert_eq!(
            (o.window, o.size, o.duration),
            (1, 1024, Duration::from_secs(2))
        );
        assert_eq!(o.fsync, "always");
        assert!(parse_args(&["pub".into(), "--fsync".into(), "sometimes".into()]).is_err());
        let n = Names::new(&o);
        assert!(n.topic.starts_with("load.t") && n.topic.ends_with(".x"));
        assert_eq!(
            n.filter.strip_suffix(".>").unwrap(),
            n.topic.strip_suffix(".x").unwrap()
        );
    }
}
