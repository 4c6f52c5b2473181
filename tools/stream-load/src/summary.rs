//! `stream-load summarize`: reads the tool's own JSON lines (one run each) and prints Markdown
//! tables of medians and ranges per scenario and broker. It parses only what the tool writes:
//! flat objects of strings, numbers, booleans and nulls; other lines are skipped.

use std::collections::BTreeMap;
use std::io::BufRead;

type Row = BTreeMap<String, String>;

/// Parses one flat JSON object into its fields, values as their text (strings unquoted).
fn parse_flat(line: &str) -> Option<Row> {
    let s = line.trim().strip_prefix('{')?.strip_suffix('}')?;
    let b = s.as_bytes();
    let mut row = Row::new();
    let mut i = 0;
    let string = |i: &mut usize| -> Option<String> {
        if b.get(*i) != Some(&b'"') {
            return None;
        }
        *i += 1;
        let mut out = String::new();
        while *i < b.len() {
            match b[*i] {
                b'"' => {
                    *i += 1;
                    return Some(out);
                }
                b'\\' => {
                    *i += 1;
                    match *b.get(*i)? {
                        b'u' => {
                            let hex = s.get(*i + 1..*i + 5)?;
                            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                            *i += 4;
                        }
                        c => out.push(c as char),
                    }
                    *i += 1;
                }
                _ => {
                    let start = *i;
                    while *i < b.len() && b[*i] != b'"' && b[*i] != b'\\' {
                        *i += 1;
                    }
                    out.push_str(&s[start..*i]);
                }
            }
        }
        None
    };
    while i < b.len() {
        let k = string(&mut i)?;
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        let v = if b.get(i) == Some(&b'"') {
            string(&mut i)?
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            s[start..i].trim().to_string()
        };
        row.insert(k, v);
        if b.get(i) == Some(&b',') {
            i += 1;
        }
    }
    Some(row)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn human(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0} k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

struct Group<'a> {
    rows: Vec<&'a Row>,
}

impl Group<'_> {
    fn values(&self, k: &str) -> Vec<f64> {
        self.rows
            .iter()
            .filter_map(|r| r.get(k)?.parse::<f64>().ok())
            .collect()
    }

    fn med(&self, k: &str) -> String {
        human(median(&mut self.values(k)))
    }

    fn med_range(&self, k: &str) -> String {
        let mut v = self.values(k);
        if v.is_empty() {
            return "-".into();
        }
        let m = median(&mut v);
        format!(
            "**{}** ({}-{})",
            human(m),
            human(v[0]),
            human(v[v.len() - 1])
        )
    }
}

/// Reads JSON lines from stdin and returns the tables.
///
/// # Errors
/// Stdin could not be read.
pub fn run() -> Result<String, String> {
    let stdin = std::io::stdin();
    let mut rows = Vec::new();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(r) = parse_flat(&line)
            && r.get("tool").map(String::as_str) == Some("stream-load")
        {
            rows.push(r);
        }
    }
    let mut groups: Vec<((String, String), Group<'_>)> = Vec::new();
    for r in &rows {
        let mode = r.get("mode").cloned().unwrap_or_default();
        if mode != "pub" && mode != "replay" {
            continue;
        }
        let scenario = match r.get("label").filter(|l| !l.is_empty()) {
            Some(l) => l.clone(),
            None => format!(
                "{} {} B w{}",
                mode,
                r.get("size").map_or("?", String::as_str),
                r.get("window").map_or("-", String::as_str)
            ),
        };
        let broker = match r.get("target").map(String::as_str) {
            Some("nats") => "nats-server (JetStream)".to_string(),
            Some(t) => format!("{t} fsync={}", r.get("fsync").map_or("?", String::as_str)),
            None => "?".into(),
        };
        let key = (scenario, broker);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.rows.push(r),
            None => groups.push((key, Group { rows: vec![r] })),
        }
    }
    let mut out = String::new();
    out.push_str(
        "| scenario | broker | runs | msgs/s median (range) | MB/s | ack p50 us | ack p99 us (range) \
         | tool CPU % | broker CPU % | machine CPU % (steal) |\n| --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |\n",
    );
    for ((s, b), g) in groups
        .iter()
        .filter(|(_, g)| g.rows[0].get("mode").is_some_and(|m| m == "pub"))
    {
        out.push_str(&format!(
            "| {s} | {b} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            g.rows.len(),
            g.med_range("msgs_per_s"),
            g.med("mb_per_s"),
            g.med("ack_p50_us"),
            g.med_range("ack_p99_us"),
            g.med("tool_cpu_pct"),
            g.med("broker_cpu_pct"),
            g.med("machine_cpu_pct") + " (" + &g.med("steal_pct") + ")",
        ));
    }
    out.push_str(
        "\n| scenario | broker | runs | replay msgs/s median (range) | MB/s | first msg ms | broker peak RSS MiB \
         | tool CPU % | broker CPU % | fill msgs/s |\n| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for ((s, b), g) in groups
        .iter()
        .filter(|(_, g)| g.rows[0].get("mode").is_some_and(|m| m == "replay"))
    {
        out.push_str(&format!(
            "| {s} | {b} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            g.rows.len(),
            g.med_range("msgs_per_s"),
            g.med("mb_per_s"),
            g.med("first_msg_ms"),
            g.med("broker_peak_rss_mib"),
            g.med("tool_cpu_pct"),
            g.med("broker_cpu_pct"),
            g.med("fill_msgs_per_s"),
        ));
    }
    for r in rows
        .iter()
        .filter(|r| r.get("mode").is_some_and(|m| m == "fsync-probe"))
    {
        out.push_str(&format!(
            "\nfsync-probe {} ({} x {} B appends + fdatasync in {}): p50 {} us, p90 {} us, p99 {} us, max {} us",
            r.get("label").map_or("", String::as_str),
            r.get("count").map_or("?", String::as_str),
            r.get("size").map_or("?", String::as_str),
            r.get("dir").map_or("?", String::as_str),
            r.get("p50_us").map_or("?", String::as_str),
            r.get("p90_us").map_or("?", String::as_str),
            r.get("p99_us").map_or("?", String::as_str),
            r.get("max_us").map_or("?", String::as_str),
        ));
    }
    Ok(out.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_objects_parse() {
        let r = parse_flat(r#"{"a":"x\"y","n":3,"f":1.5,"z":null,"b":true,"s":"p, q"}"#).unwrap();
        assert_eq!(r["a"], "x\"y");
        assert_eq!(r["n"], "3");
        assert_eq!(r["z"], "null");
        assert_eq!(r["s"], "p, q");
        assert!(parse_flat("not json").is_none());
        let mut v = vec![3.0, 1.0, 2.0];
        assert_eq!(median(&mut v), 2.0);
        assert_eq!(human(1_234_567.0), "1.23 M");
        assert_eq!(human(232_000.0), "232 k");
    }
}
