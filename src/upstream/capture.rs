//! Capture files: `[u32 little-endian length][frame bytes]` repeated, the format of existing
//! firehose captures. Owns reading and writing that format; must never trust a length
//! prefix beyond the configured frame limit.

use std::io::{self, Read, Write};

/// Reads frames from a capture, refusing any frame larger than `max_frame`.
pub struct CaptureReader<R> {
    inner: R,
    max_frame: usize,
}

impl<R: Read> CaptureReader<R> {
    pub fn new(inner: R, max_frame: usize) -> Self {
        Self { inner, max_frame }
    }

    /// The next frame, `Ok(None)` at a clean end of file.
    pub fn next_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        match read_exact_or_eof(&mut self.inner, &mut len)? {
            0 => return Ok(None),
            4 => {}
            n => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("capture ends inside a length prefix ({n} of 4 bytes)"),
                ))
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "capture frame of {len} bytes exceeds the limit of {} bytes",
                    self.max_frame
                ),
            ));
        }
        let mut frame = vec![0u8; len];
        self.inner.read_exact(&mut frame).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("capture ends inside a {len}-byte frame: {e}"),
            )
        })?;
        Ok(Some(frame))
    }
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads a whole capture into memory.
pub fn read_all(path: &std::path::Path, max_frame: usize) -> io::Result<Vec<Vec<u8>>> {
    let file = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut reader = CaptureReader::new(io::BufReader::new(file), max_frame);
    let mut frames = Vec::new();
    while let Some(frame) = reader.next_frame()? {
        frames.push(frame);
    }
    Ok(frames)
}

/// Appends one frame in capture format.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame longer than u32::MAX bytes",
        )
    })?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(frame)
}

/// Where the shared upstream fixtures live: `$SLUICE_UPSTREAM_FIXTURES`, else
/// `../shared/fixtures-upstream` relative to the crate root.
pub fn upstream_fixtures_dir() -> std::path::PathBuf {
    match std::env::var_os("SLUICE_UPSTREAM_FIXTURES") {
        Some(dir) => dir.into(),
        None => {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures-upstream")
        }
    }
}
