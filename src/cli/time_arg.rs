//! `--from`/`--to` values: RFC 3339 timestamps, or an age like `90m`, `2h`, `7d` (that long ago).

use chrono::{DateTime, Duration, Utc};

pub fn parse(s: &str) -> Result<DateTime<Utc>, String> {
    if s == "now" {
        return Ok(Utc::now());
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor an age like 90m, 2h, 7d"))?;
    let d = match unit {
        "s" => Duration::seconds(n),
        "m" => Duration::minutes(n),
        "h" => Duration::hours(n),
        "d" => Duration::days(n),
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(Utc::now() - d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_timestamps() {
        let t = parse("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let ago = Utc::now() - parse("2h").unwrap();
        assert!((ago.num_seconds() - 7200).abs() < 5);
        assert!(parse("2w").is_err());
        assert!(parse("yesterday").is_err());
    }
}
