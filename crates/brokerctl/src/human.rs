//! Numbers for people: thousands separators, SI-scaled rates and short durations, shared by the
//! `stats`, `conns`, `top` and `bench` output. Nothing here reads or writes anything.

/// `12345678` as `12,345,678`.
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `4_150_000.0` as `4.15 M`.
pub(crate) fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// A per-second rate in at most six characters and no space, to sit in a table column:
/// `0`, `0.4`, `12`, `768.0k`, `4.15M`. A rate below 10 keeps one decimal, so that a trickle
/// does not read as nothing.
pub(crate) fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if x >= 10.0 || x <= 0.0 {
        format!("{:.0}", x.max(0.0))
    } else {
        format!("{x:.1}")
    }
}

/// A wait in milliseconds, short: `0`, `850ms`, `1.5s`, `4m05s`, `3h07m`.
pub(crate) fn age(ms: u64) -> String {
    let s = ms / 1000;
    if ms == 0 {
        "0".to_string()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1234), "1,234");
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(12_345_678), "12,345,678");
        assert_eq!(group(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(si(4_150_000.0), "4.15 M");
        assert_eq!(si(768_000.0), "768.0 k");
        assert_eq!(si(12.0), "12");
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(0.4), "0.4");
        assert_eq!(rate(12.4), "12");
        assert_eq!(rate(768_000.0), "768.0k");
        assert_eq!(rate(4_150_000.0), "4.15M");
        assert_eq!(age(0), "0");
        assert_eq!(age(850), "850ms");
        assert_eq!(age(1_500), "1.5s");
        assert_eq!(age(245_000), "4m05s");
        assert_eq!(age(11_220_000), "3h07m");
    }
}
