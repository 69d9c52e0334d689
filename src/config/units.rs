//! How flags with a size or a duration are written: with a unit (`32MiB`, `20 MB`, `10s`,
//! `500ms`, `1m30s`), or as a bare number, which keeps the unit the flag always had (bytes for a
//! size; for a duration, the unit its former name ended with: `--fetch-timeout-s 10` is still 10 s),
//! so existing scripts, environment variables and charts keep working.

use std::{fmt, time::Duration};

/// A duration flag's value; shown in help as it would be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size flag's value in bytes; shown in help in the largest binary unit that divides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        match units.iter().find(|(_, n)| self.0 >= *n && self.0.is_multiple_of(*n)) {
            Some((unit, n)) => write!(f, "{}{unit}", self.0 / n),
            None => write!(f, "{}", self.0),
        }
    }
}

/// A duration; a bare number is seconds.
pub fn seconds(text: &str) -> Result<Span, String> {
    duration(text, Duration::from_secs)
}

/// A duration; a bare number is milliseconds.
pub fn millis(text: &str) -> Result<Span, String> {
    duration(text, Duration::from_millis)
}

fn duration(text: &str, bare: fn(u64) -> Duration) -> Result<Span, String> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(Span(bare(n)));
    }
    humantime::parse_duration(text)
        .map(Span)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write it as 10s, 500ms, 2m or 1h30m"))
}

/// A size; a bare number is bytes; units are decimal (kB, MB, GB) or binary (KiB, MiB, GiB).
pub fn bytes(text: &str) -> Result<Size, String> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(Size(n));
    }
    text.parse::<bytesize::ByteSize>()
        .map(|size| Size(size.as_u64()))
        .map_err(|e| format!("{text:?} is not a size ({e}); write it as 1048576, 512KiB, 32MiB or 2GB"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_numbers_keep_the_flags_unit_and_units_are_read() {
        assert_eq!(seconds("10"), Ok(Span(Duration::from_secs(10))));
        assert_eq!(millis("10"), Ok(Span(Duration::from_millis(10))));
        assert_eq!(seconds("500ms"), Ok(Span(Duration::from_millis(500))));
        assert_eq!(millis("2s"), Ok(Span(Duration::from_secs(2))));
        assert_eq!(seconds("1m30s"), Ok(Span(Duration::from_secs(90))));
        assert!(seconds("ten").unwrap_err().contains("write it as 10s"));
        assert!(seconds("-1").is_err());

        assert_eq!(bytes("33554432"), Ok(Size(32 << 20)));
        assert_eq!(bytes("32MiB"), Ok(Size(32 << 20)));
        assert_eq!(bytes("32 MiB"), Ok(Size(32 << 20)));
        assert_eq!(bytes("20MB"), Ok(Size(20_000_000)));
        assert_eq!(bytes("1KiB"), Ok(Size(1024)));
        assert!(bytes("lots").unwrap_err().contains("32MiB"));
        assert!(bytes("-5").is_err());
    }

    #[test]
    fn help_shows_values_as_they_are_written() {
        assert_eq!(Size(32 << 20).to_string(), "32MiB");
        assert_eq!(Size(1024).to_string(), "1KiB");
        assert_eq!(Size(1000).to_string(), "1000");
        assert_eq!(Size(0).to_string(), "0");
        assert_eq!(Span(Duration::from_secs(90)).to_string(), "1m 30s");
        assert_eq!(Span(Duration::from_millis(5)).to_string(), "5ms");
        for shown in [Size(20 << 20).to_string(), Size(3 << 30).to_string()] {
            assert_eq!(bytes(&shown).unwrap().to_string(), shown, "what help shows parses back");
        }
        assert_eq!(seconds(&Span(Duration::from_secs(90)).to_string()), Ok(Span(Duration::from_secs(90))));
    }
}
