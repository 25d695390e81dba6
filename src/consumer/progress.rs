//! The catch-up progress bar of `sluice tail`: while events arrive well behind the wall
//! clock (a replay from a cursor), one self-redrawing stderr line shows how far the replay
//! has come between where it started and now, the event time reached, the shrinking lag
//! and the rate; it disappears with a one-line summary once live.
//!
//! Owns only that stderr line. Must never write to stdout, draw when stderr is not a
//! terminal, or redraw more than ~10 times a second.

use std::io::Write;
use std::time::{Duration, Instant};

use super::format::format_time_us;

/// Lag above which the stream counts as a replay and the bar appears.
pub const REPLAY_LAG: Duration = Duration::from_secs(10);
/// Lag under which a replay counts as caught up and the bar goes away.
pub const LIVE_LAG: Duration = Duration::from_secs(2);
const REDRAW: Duration = Duration::from_millis(100);
const BAR_WIDTH: usize = 30;

#[derive(Debug)]
struct Replay {
    from_us: i64,
    started: Instant,
    events: u64,
    reached_us: i64,
}

/// State of the bar; inert when disabled.
pub struct Progress {
    enabled: bool,
    out: Box<dyn Write + Send>,
    replay: Option<Replay>,
    drawn: bool,
    last_draw: Option<Instant>,
}

impl Progress {
    /// A bar drawn on stderr when `enabled` (the caller checks that stderr is a terminal).
    pub fn stderr(enabled: bool) -> Self {
        Progress::new(enabled, Box::new(std::io::stderr()))
    }

    pub fn new(enabled: bool, out: Box<dyn Write + Send>) -> Self {
        Progress {
            enabled,
            out,
            replay: None,
            drawn: false,
            last_draw: None,
        }
    }

    /// Whether a replay is in progress (lag above [`REPLAY_LAG`] and not yet caught up).
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// Notes a delivered event with source time `time_us`, at wall-clock `now_us`.
    pub fn on_event(&mut self, time_us: i64, now_us: i64) {
        if !self.enabled {
            return;
        }
        let lag_us = now_us.saturating_sub(time_us);
        match &mut self.replay {
            None => {
                if lag_us > REPLAY_LAG.as_micros() as i64 {
                    self.replay = Some(Replay {
                        from_us: time_us,
                        started: Instant::now(),
                        events: 1,
                        reached_us: time_us,
                    });
                }
            }
            Some(r) => {
                r.events += 1;
                r.reached_us = r.reached_us.max(time_us);
                if lag_us < LIVE_LAG.as_micros() as i64 {
                    self.finish_replay(now_us);
                    return;
                }
            }
        }
        if self.replay.is_some() && self.last_draw.is_none_or(|t| t.elapsed() >= REDRAW) {
            self.draw(now_us);
        }
    }

    /// Redraws on a timer even without events (the lag keeps growing while stalled).
    pub fn tick(&mut self, now_us: i64) {
        if self.enabled && self.replay.is_some() {
            self.draw(now_us);
        }
    }

    /// Erases the bar so another line can be written to the terminal; the next event or
    /// tick draws it again.
    pub fn clear(&mut self) {
        if self.drawn {
            let _ = self.out.write_all(b"\r\x1b[2K");
            let _ = self.out.flush();
            self.drawn = false;
        }
    }

    /// Erases the bar for good.
    pub fn finish(&mut self) {
        self.clear();
        self.replay = None;
    }

    fn finish_replay(&mut self, now_us: i64) {
        self.clear();
        if let Some(r) = self.replay.take() {
            let secs = r.started.elapsed().as_secs_f64();
            let _ = writeln!(
                self.out,
                "caught up: {} events from {} in {:.1}s ({:.0}/s), lag now {}",
                r.events,
                format_time_us(r.from_us),
                secs,
                r.events as f64 / secs.max(1e-3),
                human_lag(now_us.saturating_sub(r.reached_us)),
            );
            let _ = self.out.flush();
        }
    }

    fn draw(&mut self, now_us: i64) {
        let Some(r) = &self.replay else { return };
        let line = render(r, now_us);
        let _ = write!(self.out, "\r\x1b[2K{line}");
        let _ = self.out.flush();
        self.drawn = true;
        self.last_draw = Some(Instant::now());
    }
}

fn render(r: &Replay, now_us: i64) -> String {
    let span = (now_us - r.from_us).max(1) as f64;
    let fraction = ((r.reached_us - r.from_us) as f64 / span).clamp(0.0, 1.0);
    let filled = (fraction * BAR_WIDTH as f64).round() as usize;
    let secs = r.started.elapsed().as_secs_f64().max(1e-3);
    format!(
        "catching up [{}{}] {:>3.0}%  at {}  lag {}  {:.0} ev/s",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        fraction * 100.0,
        format_time_us(r.reached_us),
        human_lag(now_us.saturating_sub(r.reached_us)),
        r.events as f64 / secs,
    )
}

/// `3h02m`, `4m10s`, `12.3s`.
pub fn human_lag(us: i64) -> String {
    let s = us.max(0) as f64 / 1e6;
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        let m = (s / 60.0) as u64;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lags() {
        assert_eq!(human_lag(12_345_678), "12.3s");
        assert_eq!(human_lag(250_000_000), "4m10s");
        assert_eq!(human_lag(10_920_000_000), "3h02m");
    }

    #[test]
    fn shows_a_replay_then_gets_out_of_the_way() {
        let buf = Shared::default();
        let mut p = Progress::new(true, Box::new(buf.clone()));
        let now = 1_000_000_000_000_000i64;
        let hour = 3_600_000_000i64;
        p.on_event(now - hour, now);
        assert!(p.replaying());
        p.tick(now);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("catching up ["), "{text}");
        assert!(text.contains("lag 1h00m"), "{text}");
        p.on_event(now - 1_000, now);
        assert!(!p.replaying());
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("caught up: 2 events"), "{text}");
        // Live events never draw.
        let before = buf.0.lock().unwrap().len();
        p.on_event(now - 1_000, now);
        assert_eq!(buf.0.lock().unwrap().len(), before);

        let quiet = Shared::default();
        let mut off = Progress::new(false, Box::new(quiet.clone()));
        off.on_event(now - hour, now);
        off.tick(now);
        assert!(quiet.0.lock().unwrap().is_empty());
    }

    #[test]
    fn renders_progress_fraction() {
        let r = Replay {
            from_us: 0,
            started: Instant::now(),
            events: 10,
            reached_us: 50,
        };
        let line = render(&r, 100);
        assert!(line.contains(" 50%"), "{line}");
        assert!(line.contains(&format!("[{}{}]", "#".repeat(15), "-".repeat(15))));
    }
}
