//! `fanout`'s subscribers in processes of their own (`--sub-procs N`).
//!
//! In the bench's own process 200 subscribers took more than a core beside the publisher,
//! and their reading delayed each other on the bench's runtime: the latency measured the
//! bench as much as the target. Each `sluice-bench fanout-read` child runs a share of the
//! subscribers (websocket or plain RESP, the same connect and read code as in-process ones)
//! on one thread, counts every message and stamps one in `--sample` with the wall clock;
//! the parent turns the stamps into latencies against its send stamps and reads the
//! children's CPU apart from the target's and its own. The protocol on stdin and stdout is
//! `redis_readers`'s (`snap` for the counts, `s <key> <unix ns>` for the stamps).

use std::cell::RefCell;
use std::net::IpAddr;
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Parser;

use crate::control::Control;
use crate::redis_readers::{child_main, Readers, Shared};
use crate::replayers::unix_ns;
use crate::stamps::Stamps;
use crate::subscribers::{connect_from, decoder_dictionary, read_messages, SubSpec};

#[derive(Parser, Clone)]
pub(crate) struct FanoutReadArgs {
    /// One subscriber: `<source IP or ->,<v2 0|1>,<compressed 0|1>,<dictionary 0|1|2>,<url>`
    /// (dictionary: the zstd dictionary it decompresses with to time messages, 0 = none).
    #[arg(long = "sub")]
    subs: Vec<String>,
    /// One message in this many (per subscriber) is stamped.
    #[arg(long, default_value_t = 4)]
    sample: u64,
}

/// The `--sub` argument of one subscriber.
fn sub_arg(spec: &SubSpec, source: Option<IpAddr>) -> String {
    let dictionary = match spec.dictionary {
        None => 0,
        Some(d) if std::ptr::eq(d, decoder_dictionary(1)) => 1,
        Some(_) => 2,
    };
    format!(
        "{},{},{},{dictionary},{}",
        source.map_or("-".to_string(), |ip| ip.to_string()),
        u8::from(spec.v2),
        u8::from(spec.compressed),
        spec.url
    )
}

fn parse_sub(arg: &str) -> anyhow::Result<(SubSpec, Option<IpAddr>)> {
    let mut parts = arg.splitn(5, ',');
    let mut next = || parts.next().ok_or_else(|| anyhow!("bad --sub {arg:?}"));
    let source = match next()? {
        "-" => None,
        ip => Some(ip.parse()?),
    };
    let v2 = next()? == "1";
    let compressed = next()? == "1";
    let dictionary = match next()? {
        "0" => None,
        "1" => Some(decoder_dictionary(1)),
        "2" => Some(decoder_dictionary(2)),
        other => bail!("bad dictionary {other:?} in --sub"),
    };
    let url = next()?.to_string();
    Ok((
        SubSpec {
            url,
            v2,
            compressed,
            dictionary,
            filter: None,
            stalls: false,
        },
        source,
    ))
}

/// `sluice-bench fanout-read`: the child. Runs until its stdin closes.
pub(crate) fn read_main(args: FanoutReadArgs) -> anyhow::Result<()> {
    let subs = args
        .subs
        .iter()
        .map(|s| parse_sub(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sample = args.sample.max(1);
    child_main(subs.len(), move |shared| {
        for (i, (spec, source)) in subs.into_iter().enumerate() {
            tokio::task::spawn_local(subscriber(i, spec, source, sample, Rc::clone(&shared)));
        }
    })
}

async fn subscriber(
    i: usize,
    spec: SubSpec,
    source: Option<IpAddr>,
    sample: u64,
    shared: Rc<RefCell<Shared>>,
) {
    let conn = match connect_from(&spec, source).await {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("subscriber {i}: connect failed: {e:#}");
            return;
        }
    };
    shared.borrow_mut().connected[i] = true;
    let mut seen = 0u64;
    let end = read_messages(
        &spec,
        conn,
        || false,
        |key, _| {
            seen += 1;
            let mut s = shared.borrow_mut();
            s.totals[i] += 1;
            if seen % sample == 0 && s.samples.len() < 1 << 20 {
                if let Some(key) = key {
                    s.samples.push((key, unix_ns()));
                }
            }
        },
    )
    .await;
    shared.borrow_mut().connected[i] = false;
    eprintln!("subscriber {i}: {end}");
}

/// Starts the children for `subs` (each with its source address), spread over `procs`
/// processes, and waits up to `connect_wait` for every subscriber to connect. Returns the
/// readers and how many connected.
pub(crate) async fn spawn(
    subs: &[(Arc<SubSpec>, Option<IpAddr>)],
    procs: usize,
    sample: u64,
    log_dir: &std::path::Path,
    ctl: Arc<Control>,
    stamps: Arc<Stamps>,
    connect_wait: Duration,
) -> anyhow::Result<(Readers, usize)> {
    let exe = std::env::current_exe()?;
    let per = subs
        .len()
        .div_ceil(procs.clamp(1, subs.len().max(1)))
        .max(1);
    let commands = subs
        .chunks(per)
        .map(|share| {
            let mut cmd = Command::new(&exe);
            cmd.arg("fanout-read")
                .args(["--sample", &sample.to_string()]);
            for (spec, source) in share {
                cmd.arg(format!("--sub={}", sub_arg(spec, *source)));
            }
            (cmd, share.len())
        })
        .collect();
    let mut readers = Readers::start("fanout-read", commands, log_dir, ctl, stamps)?;
    let until = Instant::now() + connect_wait;
    loop {
        readers.check_alive()?;
        let connected = readers.snapshot().await?.connected as usize;
        if connected >= subs.len() || Instant::now() >= until {
            return Ok((readers, connected));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
