//! Human durations as written in `drover.toml`: `500ms`, `10s`, `2m`, `1h`, `30d`,
//! or combinations such as `1m30s`.

/// Parses a duration into milliseconds. Returns a message naming what is
/// wrong on failure.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. \"10s\" or \"500ms\"".into());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}; write a number with a unit: ms, s, m, h or d (e.g. \"10s\")"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {s:?} is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "duration {s:?} has no unit; write e.g. \"{n}s\" or \"{n}ms\""
                ))
            }
            other => {
                return Err(format!(
                    "unknown unit {other:?} in duration {s:?}; use ms, s, m, h or d"
                ))
            }
        };
        total = n
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
    }
    Ok(total)
}

/// Formats milliseconds compactly (`1.5s`, `250ms`, `2m5s`).
pub fn format_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        if ms.is_multiple_of(1_000) {
            format!("{}s", ms / 1_000)
        } else {
            format!("{:.1}s", ms as f64 / 1_000.0)
        }
    } else {
        let m = ms / 60_000;
        let s = (ms % 60_000) / 1_000;
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_combinations() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("30d"), Ok(2_592_000_000));
    }

    #[test]
    fn durations_without_unit_or_with_unknown_unit_are_rejected_with_advice() {
        assert!(parse_duration_ms("10").unwrap_err().contains("no unit"));
        assert!(parse_duration_ms("10w")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration_ms("").is_err());
        assert!(parse_duration_ms("s").is_err());
        assert!(parse_duration_ms("99999999999999999999s").is_err());
    }

    #[test]
    fn formatting_is_compact() {
        assert_eq!(format_ms(250), "250ms");
        assert_eq!(format_ms(1_500), "1.5s");
        assert_eq!(format_ms(125_000), "2m5s");
    }
}
