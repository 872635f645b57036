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
        "s" => Duration::try_seconds(n),
        "m" => Duration::try_minutes(n),
        "h" => Duration::try_hours(n),
        "d" => Duration::try_days(n),
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    d.and_then(|d| Utc::now().checked_sub_signed(d))
        .ok_or_else(|| format!("{s:?} is too far back"))
}

/// How far past now `--to` may reach: a replica whose clock runs a little
/// ahead may have written records stamped after this machine's now; nothing
/// is written later than that.
const LATEST_AHEAD_HOURS: i64 = 1;

/// Refuses a time range that starts before the WAL's retention or ends
/// more than [`LATEST_AHEAD_HOURS`] after now: nothing is kept before, nothing
/// written after, and walking their hourly partitions one list call each
/// would take hours.
pub fn check_retention(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    retention_days: u32,
) -> anyhow::Result<()> {
    let now = Utc::now();
    // A minute's slack: the default `--from 24h` was taken when the
    // arguments were parsed, and must pass a retention of one day.
    let oldest = now - Duration::days(i64::from(retention_days)) - Duration::seconds(60);
    let secs = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if from < oldest {
        anyhow::bail!(
            "--from {} is before the WAL's retention ({retention_days} days, RTPD_WAL_RETENTION_DAYS): \
             the oldest start allowed is {}",
            secs(from),
            secs(oldest)
        );
    }
    let latest = now + Duration::hours(LATEST_AHEAD_HOURS);
    if to > latest {
        anyhow::bail!(
            "--to {} is in the future: the latest end allowed is {} (now + {LATEST_AHEAD_HOURS} h; \
             nothing in the WAL is later)",
            secs(to),
            secs(latest)
        );
    }
    if to < from {
        anyhow::bail!("--to {} is before --from {}", secs(to), secs(from));
    }
    Ok(())
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

    #[test]
    fn ranges_beyond_the_wal_retention_are_refused() {
        assert!(parse("99999999999999h").is_err());
        let far = parse("99999999h").unwrap();
        let e = check_retention(far, Utc::now(), 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("RTPD_WAL_RETENTION_DAYS"), "{e}");
        assert!(check_retention(parse("29d").unwrap(), Utc::now(), 30).is_ok());
        assert!(check_retention(Utc::now(), parse("1h").unwrap(), 30).is_err());
        let future = parse("2999-01-01T00:00:00Z").unwrap();
        let e = check_retention(parse("1h").unwrap(), future, 30)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--to 2999-01-01T00:00:00Z is in the future"),
            "{e}"
        );
        assert!(
            check_retention(parse("1h").unwrap(), Utc::now() + Duration::minutes(30), 30).is_ok()
        );
    }
}
