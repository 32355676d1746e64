//! Human-friendly byte sizes (`512M`, `2G`, `4096`) as used on every command line of the project.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size '{0}' is empty")]
    Empty(String),
    #[error("size '{0}' is not a number with an optional K/M/G/T suffix")]
    Malformed(String),
    #[error("size '{0}' does not fit in 64 bits")]
    Overflow(String),
}

/// Parses `N`, `NK`, `NM`, `NG` or `NT` (binary multiples, case-insensitive, optional trailing `iB`/`B`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SizeError::Empty(text.to_string()));
    }
    let lower = trimmed.to_ascii_lowercase();
    let without_b = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match without_b.chars().last() {
        Some('k') => (&without_b[..without_b.len() - 1], 10),
        Some('m') => (&without_b[..without_b.len() - 1], 20),
        Some('g') => (&without_b[..without_b.len() - 1], 30),
        Some('t') => (&without_b[..without_b.len() - 1], 40),
        _ => (without_b, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Malformed(text.to_string()));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_size(""), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("M"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("-1G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("99999999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }
}
