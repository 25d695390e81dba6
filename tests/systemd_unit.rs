//! `systemd/sluice.service` passes `systemd-analyze verify`, with ExecStart pointed at the
//! binary this test suite built, and keeps the settings the operations issue requires.
//! Fails loudly when `systemd-analyze` is missing (Debian package `systemd`; `.ci/run`
//! installs it).

use std::path::Path;
use std::process::Command;

const UNIT: &str = include_str!("../systemd/sluice.service");
const TEMPLATE: &str = include_str!("../systemd/sluice@.service");
const INSTALLED_BINARY: &str = "/usr/local/bin/sluice";

fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn value<'a>(all: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    all.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// `systemd-analyze verify` of `unit` written as `file` (ExecStart pointed at the built
/// binary): fails on any complaint about it.
fn verify(unit: &str, file: &str) {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    match analyze {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "systemd-analyze is required for this test (Debian package `systemd`, \
             installed by .ci/run): {other:?}"
        ),
    }
    let binary = env!("CARGO_BIN_EXE_sluice");
    assert!(Path::new(binary).exists(), "{binary} missing");
    assert!(unit.contains(INSTALLED_BINARY));
    let dir = tempfile::tempdir().unwrap();
    let unit_path = dir.path().join(file);
    std::fs::write(&unit_path, unit.replace(INSTALLED_BINARY, binary)).unwrap();

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stdout}\n{stderr}"
    );
    // verify exits 0 on some problems (unknown keys, bad values) and only prints them;
    // any line about our unit is a failure.
    let name = file.split('@').next().unwrap_or(file);
    let complaints: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains(name))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complained:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    verify(UNIT, "sluice.service");
}

/// The templated unit for several nodes on one host, verified as an instance.
#[test]
fn template_unit_passes_systemd_analyze_verify() {
    assert!(TEMPLATE.contains("--config /etc/sluice/%i.toml"));
    assert!(TEMPLATE.contains("StateDirectory=sluice-%i"));
    verify(TEMPLATE, "sluice@node-a.service");
}

#[test]
fn unit_keeps_the_required_settings() {
    let all = directives(UNIT);
    let one = |key: &str| -> String {
        let v = value(&all, key);
        assert_eq!(v.len(), 1, "{key} set {} times", v.len());
        v[0].to_string()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/sluice serve --config /etc/sluice/sluice.toml"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("StateDirectory"), "sluice");
    assert_eq!(one("User"), "sluice");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert_eq!(one("RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");
    assert_eq!(one("LimitNOFILE"), "1048576");
    // The idle catch-up pool's starvation bound raises starved threads to nice 19.
    assert_eq!(one("LimitNICE"), "1");
    let watchdog: u64 = one("WatchdogSec").parse().unwrap();
    assert_eq!(watchdog, 30);
    // The stop timeout must leave headroom above sluice's own shutdown timeout
    // (systemd/sluice.example.toml's shutdown_timeout_secs).
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    let example = include_str!("../systemd/sluice.example.toml");
    let shutdown: u64 = example
        .lines()
        .find_map(|l| l.trim().strip_prefix("shutdown_timeout_secs"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().parse().unwrap())
        .expect("example config sets shutdown_timeout_secs");
    assert!(
        stop >= shutdown + 5,
        "TimeoutStopSec={stop} leaves too little over shutdown_timeout_secs={shutdown}"
    );
}

#[test]
fn example_config_passes_config_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/sluice.example.toml");
    let mut check = Command::new(env!("CARGO_BIN_EXE_sluice"));
    check.args(["config", "check", "--config", example]);
    // Only the file may speak: SLUICE_* variables would override it.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SLUICE_") {
            check.env_remove(key);
        }
    }
    let out = check.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sluice config check rejected the example:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("/var/lib/sluice"), "{stdout}");
    // The example's 20 GiB, 4 of them for raw frames, at real traffic's bytes per event:
    // the JSON wires hold more than two days at 500 events/s and a day at 1,000; the raw
    // frames' share is what limits them.
    assert!(
        stdout.contains("20.0 GiB in all = 16.0 GiB for the JSON wires"),
        "{stdout}"
    );
    let hours = |class: &str, rate: &str| -> f64 {
        let section = stdout
            .split("\nreplay depth of the ")
            .find(|s| s.starts_with(class))
            .unwrap_or_else(|| panic!("no projection for {class}:\n{stdout}"));
        let line = section
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("at {rate} events/s")))
            .unwrap_or_else(|| panic!("no {rate} events/s line for {class}:\n{stdout}"));
        line.split('~')
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(hours("JSON wires", "  500") >= 48.0, "{stdout}");
    assert!(hours("JSON wires", " 1000") >= 24.0, "{stdout}");
    let raw_500 = hours("raw frames", "  500");
    assert!(
        raw_500 > 0.5 && raw_500 < 1.0,
        "4 GiB of 3,421-byte frames at 500/s: {stdout}"
    );
    assert!(
        stdout.contains("at  1000 events/s: ~0.3 h (--raw-retention-max-gib is the limit)"),
        "{stdout}"
    );
}
