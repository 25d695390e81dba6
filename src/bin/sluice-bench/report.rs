//! Printing of phase results and the median summary.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::hist::Hist;

/// The file each result is appended to as one JSON line (`--json`), if one was given.
pub(crate) fn open_results(path: Option<&Path>) -> anyhow::Result<Option<std::fs::File>> {
    path.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))
    })
    .transpose()
}

pub(crate) fn q(h: &Hist, p: f64) -> serde_json::Value {
    h.quantile(p).map_or(serde_json::Value::Null, |v| json!(v))
}

pub(crate) fn f(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if (x.fract() == 0.0 && x.abs() < 1e15) || x.abs() >= 100.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.2}")
            }
        }
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub(crate) fn print_phase(r: &serde_json::Value) {
    eprintln!(
        "  {} mix={} subs={}/{} rate={} (achieved {}/s): delivered {}/s (ratio {}), \
         CPU {} us/event ({}% of a core), p50 {} us p99 {} us max {} us, \
         RSS base {} KiB idle {} KiB ({} B/sub) end {} KiB (slope {} KiB/s); bench CPU {}% (subscriber processes {}%), machine busy {}%, load {}",
        r["target"].as_str().unwrap_or(""),
        r["mix"].as_str().unwrap_or(""),
        f(&r["connected"]),
        f(&r["subscribers"]),
        f(&r["rate"]),
        f(&r["frame_rate_achieved"]),
        f(&r["delivered_per_sec"]),
        f(&r["delivery_ratio"]),
        f(&r["cpu_us_per_event"]),
        f(&r["cpu_pct"]),
        f(&r["p50_us"]),
        f(&r["p99_us"]),
        f(&r["max_us"]),
        f(&r["rss_base_kb"]),
        f(&r["rss_idle_kb"]),
        f(&r["idle_bytes_per_subscriber"]),
        f(&r["rss_end_measure_kb"]),
        f(&r["rss_slope_measure_kb_s"]),
        f(&r["bench_cpu_pct"]),
        f(&r["sub_procs_cpu_pct"]),
        f(&r["machine_busy_pct"]),
        r["loadavg_at_measure"].as_str().unwrap_or(""),
    );
    eprintln!(
        "  steal {}% of the machine, load at the end {}; behind at the window's end {} messages; \
         after the source stopped: missing {} after {} s ({})",
        f(&r["steal_pct"]),
        r["loadavg_at_end"].as_str().unwrap_or(""),
        f(&r["behind_at_end"]),
        f(&r["missing_after_drain"]),
        f(&r["drain_s"]),
        if r["still_reading_after_drain"].as_bool() == Some(true) {
            "still reading: late, not known lost"
        } else if r["missing_after_drain"].as_u64() == Some(0) {
            "nothing lost"
        } else {
            "no progress for 2 s: lost"
        },
    );
    let h = &r["hub"];
    if let Some(h) = h.as_object() {
        let line: Vec<String> = h
            .iter()
            .map(|(k, v)| {
                let at = |i: usize| f(&v[i]);
                format!("{k} {}/{}/{}", at(0), at(1), at(2))
            })
            .collect();
        eprintln!("  hub (window start/end/after drain): {}", line.join(", "));
    }
    let s = &r["stall"];
    if !s.is_null() {
        eprintln!(
            "  stall {}s of {} subs: RSS start {} max {} end {} KiB (growth {}%, slope {} KiB/s); others p99 {} us max {} us; \
             stalled ended {} resumed {}; others ended {}",
            f(&s["secs"]),
            f(&s["stalled_subscribers"]),
            f(&s["rss_start_kb"]),
            f(&s["rss_max_kb"]),
            f(&s["rss_end_kb"]),
            f(&s["rss_growth_pct"]),
            f(&s["rss_slope_kb_s"]),
            f(&s["others_p99_us"]),
            f(&s["others_max_us"]),
            f(&s["stalled_ended"]),
            f(&s["stalled_resumed_reading"]),
            f(&s["others_ended"]),
        );
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn print_summary(results: &[serde_json::Value]) {
    let mut targets: Vec<String> = Vec::new();
    for r in results {
        let t = r["target"].as_str().unwrap_or("").to_owned();
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    let get = |rs: &[&serde_json::Value], path: &[&str]| -> f64 {
        median(
            rs.iter()
                .map(|r| {
                    let mut v = *r;
                    for p in path {
                        v = &v[*p];
                    }
                    v.as_f64().unwrap_or(f64::NAN)
                })
                .collect(),
        )
    };
    let sluice_raw: Vec<&serde_json::Value> = results
        .iter()
        .filter(|r| r["target"] == "sluice/raw")
        .collect();
    let base_cpu = get(&sluice_raw, &["cpu_us_per_event"]);
    println!(
        "| target | runs | delivered/s | CPU µs/event | vs sluice/raw | p50 µs | p99 µs | max µs | idle B/sub | RSS end KiB | stall RSS growth % | bench CPU % | machine busy % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for t in targets {
        let rs: Vec<&serde_json::Value> = results.iter().filter(|r| r["target"] == t).collect();
        let cpu = get(&rs, &["cpu_us_per_event"]);
        println!(
            "| {t} | {} | {:.0} | {:.2} | {:.2}× | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} |",
            rs.len(),
            get(&rs, &["delivered_per_sec"]),
            cpu,
            cpu / base_cpu,
            get(&rs, &["p50_us"]),
            get(&rs, &["p99_us"]),
            get(&rs, &["max_us"]),
            get(&rs, &["idle_bytes_per_subscriber"]),
            get(&rs, &["rss_end_measure_kb"]),
            {
                let g = get(&rs, &["stall", "rss_growth_pct"]);
                if g.is_finite() {
                    format!("{g:.1}")
                } else {
                    "-".into()
                }
            },
            get(&rs, &["bench_cpu_pct"]),
            get(&rs, &["machine_busy_pct"]),
        );
    }
}
