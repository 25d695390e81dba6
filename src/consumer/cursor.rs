//! The position of `sluice tail` in the stream, and the `--cursor-file` that keeps it
//! across runs.
//!
//! A Jetstream v1 cursor is a `time_us`, and the server replays from it *inclusively*, so
//! resuming at the last `time_us` seen sends that event (and any other event with the same
//! `time_us`, e.g. the other ops of one commit) again. [`Position`] therefore remembers
//! the identity of every event seen at its `time_us` and skips exactly those on resume.
//!
//! File format (text, so operators can read it and pass the first line to `--cursor`):
//! line 1 is the `time_us`; each further line is the JSON string of one event identity
//! already delivered at that `time_us`. Written atomically: temp file, fsync, rename.
//!
//! Must never: move the position backwards, skip an event that was not delivered (only
//! exact identity matches at the position's own `time_us` are skipped), or leave a
//! half-written cursor file behind.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The last delivered `time_us` and the identities of the events delivered at it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    time_us: Option<i64>,
    seen: HashSet<String>,
}

impl Position {
    /// A position that has seen nothing yet (or only knows a starting cursor).
    pub fn new() -> Self {
        Position::default()
    }

    /// The cursor to resume from, if any event was delivered.
    pub fn time_us(&self) -> Option<i64> {
        self.time_us
    }

    /// Number of identities remembered at the current `time_us`.
    pub fn seen_at_cursor(&self) -> usize {
        self.seen.len()
    }

    /// Whether an event is a replay of one already delivered at the current position.
    pub fn is_duplicate(&self, time_us: i64, identity: &str) -> bool {
        self.time_us == Some(time_us) && self.seen.contains(identity)
    }

    /// Records a delivered event. An event older than the position (a server with
    /// unordered times) is delivered but does not move the position back.
    pub fn advance(&mut self, time_us: i64, identity: String) {
        match self.time_us {
            Some(t) if time_us < t => {}
            Some(t) if time_us == t => {
                self.seen.insert(identity);
            }
            _ => {
                self.time_us = Some(time_us);
                self.seen.clear();
                self.seen.insert(identity);
            }
        }
    }

    /// The text form stored in a cursor file.
    pub fn encode(&self) -> Option<String> {
        let time_us = self.time_us?;
        let mut out = format!("{time_us}\n");
        let mut seen: Vec<&String> = self.seen.iter().collect();
        seen.sort();
        for identity in seen {
            // A JSON string never contains a raw newline.
            out.push_str(&serde_json::Value::String(identity.clone()).to_string());
            out.push('\n');
        }
        Some(out)
    }

    /// Parses a cursor file's text: a `time_us` line, then identity lines. A file holding
    /// only a number (written by hand) is a plain cursor with nothing to skip.
    pub fn decode(text: &str) -> anyhow::Result<Position> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let Some(first) = lines.next() else {
            bail!("empty cursor file");
        };
        let time_us: i64 = first
            .parse()
            .with_context(|| format!("first line {first:?} is not a time_us"))?;
        if time_us < 0 {
            bail!("negative time_us {time_us}");
        }
        let mut seen = HashSet::new();
        for line in lines {
            let identity: String = serde_json::from_str(line)
                .with_context(|| format!("bad event identity line {line:?}"))?;
            seen.insert(identity);
        }
        Ok(Position {
            time_us: Some(time_us),
            seen,
        })
    }
}

/// A `--cursor-file`: loads once, then saves at most every `min_interval` and on demand.
#[derive(Debug)]
pub struct CursorFile {
    path: PathBuf,
    min_interval: Duration,
    last_save: Option<Instant>,
    saved: Option<String>,
}

impl CursorFile {
    pub fn new(path: &Path, min_interval: Duration) -> Self {
        CursorFile {
            path: path.to_path_buf(),
            min_interval,
            last_save: None,
            saved: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved position, `None` if the file does not exist. A file that exists but
    /// cannot be read or parsed is an error: starting from live would silently skip.
    pub fn load(&mut self) -> anyhow::Result<Option<Position>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let pos = Position::decode(&text)
                    .with_context(|| format!("cursor file {}", self.path.display()))?;
                self.saved = pos.encode();
                Ok(Some(pos))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => {
                Err(err).with_context(|| format!("cannot read cursor file {}", self.path.display()))
            }
        }
    }

    /// Saves if the position changed and `min_interval` passed since the last save.
    pub fn maybe_save(&mut self, pos: &Position) -> anyhow::Result<bool> {
        if self
            .last_save
            .is_some_and(|t| t.elapsed() < self.min_interval)
        {
            return Ok(false);
        }
        self.save(pos)
    }

    /// Saves now if the position changed since the last save.
    pub fn save(&mut self, pos: &Position) -> anyhow::Result<bool> {
        let Some(text) = pos.encode() else {
            return Ok(false);
        };
        if self.saved.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        write_atomically(&self.path, text.as_bytes())
            .with_context(|| format!("cannot save cursor file {}", self.path.display()))?;
        self.saved = Some(text);
        self.last_save = Some(Instant::now());
        Ok(true)
    }
}

/// Writes `path` so that readers see either the old or the new content, never a mix.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cursor".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every filesystem supports this.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedups_only_exact_events_at_the_position() {
        let mut p = Position::new();
        assert!(!p.is_duplicate(10, "a"));
        p.advance(10, "a".into());
        p.advance(10, "b".into());
        assert!(p.is_duplicate(10, "a") && p.is_duplicate(10, "b"));
        assert!(!p.is_duplicate(10, "c"));
        assert!(!p.is_duplicate(9, "a"));
        p.advance(12, "c".into());
        assert_eq!(p.time_us(), Some(12));
        assert!(!p.is_duplicate(10, "a"));
        p.advance(11, "late".into());
        assert_eq!(p.time_us(), Some(12));
        assert_eq!(p.seen_at_cursor(), 1);
    }

    #[test]
    fn round_trips_and_accepts_a_bare_number() {
        let mut p = Position::new();
        assert_eq!(p.encode(), None);
        p.advance(1_700_000_000_000_000, "did:plc:x\tcommit\n\"odd\"".into());
        p.advance(1_700_000_000_000_000, "did:plc:y".into());
        let text = p.encode().unwrap();
        assert_eq!(text.lines().count(), 3);
        assert_eq!(Position::decode(&text).unwrap(), p);
        let bare = Position::decode("1700000000000000\n").unwrap();
        assert_eq!(bare.time_us(), Some(1_700_000_000_000_000));
        assert_eq!(bare.seen_at_cursor(), 0);
        assert!(Position::decode("").is_err());
        assert!(Position::decode("soon").is_err());
        assert!(Position::decode("-5").is_err());
        assert!(Position::decode("5\nnot json").is_err());
    }

    #[test]
    fn saves_atomically_and_rate_limits() {
        let dir = std::env::temp_dir().join(format!("sluice-cursor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cursor");
        let _ = std::fs::remove_file(&path);
        let mut file = CursorFile::new(&path, Duration::from_secs(3600));
        assert_eq!(file.load().unwrap(), None);
        let mut p = Position::new();
        assert!(!file.save(&p).unwrap());
        p.advance(5, "a".into());
        assert!(file.maybe_save(&p).unwrap());
        p.advance(6, "b".into());
        assert!(!file.maybe_save(&p).unwrap(), "rate limited");
        assert!(file.save(&p).unwrap());
        assert!(!file.save(&p).unwrap(), "unchanged");
        let mut again = CursorFile::new(&path, Duration::ZERO);
        assert_eq!(again.load().unwrap(), Some(p));
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::write(&path, "garbage").unwrap();
        assert!(CursorFile::new(&path, Duration::ZERO).load().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
