//! Numbers for people: thousands separators and SI-scaled rates, shared by the `stats` and
//! `bench` output. Nothing here reads or writes anything.

/// `12345678` as `12,345,678`.
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
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
    }
}
