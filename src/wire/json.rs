//! Small JSON writing helpers shared by the JSON wires. Owns escaping and time formatting;
//! must never allocate per call beyond the output buffer.

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Most strings (DIDs, NSIDs, keys) need no escape: one check, one copy.
    if !bytes.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `"key":` (keys are trusted constants).
pub fn push_key(out: &mut Vec<u8>, key: &str) {
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

pub fn push_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

pub fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Appends unix µs as an RFC 3339 UTC string with microsecond precision, quoted. Runs once
/// per v2 event, so it writes digits straight into `out` instead of formatting a String.
pub fn push_time_us(out: &mut Vec<u8>, time_us: i64) {
    let secs = time_us.div_euclid(1_000_000);
    let micros = time_us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    out.push(b'"');
    push_padded(out, y, 4);
    out.push(b'-');
    push_padded(out, i64::from(m), 2);
    out.push(b'-');
    push_padded(out, i64::from(d), 2);
    out.push(b'T');
    push_padded(out, sod / 3600, 2);
    out.push(b':');
    push_padded(out, (sod / 60) % 60, 2);
    out.push(b':');
    push_padded(out, sod % 60, 2);
    out.push(b'.');
    push_padded(out, micros, 6);
    out.extend_from_slice(b"Z\"");
}

/// Zero-padded to `width` digits (a negative year keeps its sign, as `{:04}` does).
fn push_padded(out: &mut Vec<u8>, value: i64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(value.unsigned_abs());
    if value < 0 {
        out.push(b'-');
    }
    let sign = usize::from(value < 0);
    for _ in digits.len() + sign..width {
        out.push(b'0');
    }
    out.extend_from_slice(digits.as_bytes());
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_and_quotes() {
        let mut out = Vec::new();
        push_str(&mut out, "a\"b\\c\nd\u{1}é");
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
        // Strings with nothing to escape take the one-copy path: same bytes as serde.
        for plain in [
            "",
            "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
            "app.bsky.feed.post",
            "é~ ",
        ] {
            let mut out = b"x".to_vec();
            push_str(&mut out, plain);
            assert_eq!(&out[1..], serde_json::to_string(plain).unwrap().as_bytes());
        }
    }

    #[test]
    fn formats_time_like_rfc3339() {
        for t in [0i64, 1_725_911_162_329_308, 951_782_400_000_001, -1] {
            let mut out = Vec::new();
            push_time_us(&mut out, t);
            let s: String = serde_json::from_slice(&out).unwrap();
            let parsed =
                time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                    .unwrap();
            assert_eq!(parsed.unix_timestamp_nanos(), i128::from(t) * 1000, "{s}");
        }
    }
}
