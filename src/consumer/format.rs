//! How `sluice tail` prints one event: `pretty` (one human line) or `jsonl` (the event's
//! JSON exactly as received, one per line), and the identity used to recognise an event
//! replayed after a resume.
//!
//! Must never fail on an unexpected shape: unknown kinds, missing fields and odd records
//! still print something (pretty) or print verbatim (jsonl).

use serde_json::Value;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One human line per event: time, did, kind, operation, collection/rkey, summary.
    Pretty,
    /// Each event's JSON verbatim, one per line.
    Jsonl,
}

/// The identity of an event for resume dedup: the same event replayed gives the same
/// string, different events (different ops of one commit included) give different ones.
pub fn identity(event: &Value) -> String {
    let s = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    let kind = s(event.get("kind"));
    let mut parts = vec![s(event.get("did")), kind.clone()];
    if let Some(cursor) = event.get("cursor") {
        parts.push(cursor.to_string());
    }
    match kind.as_str() {
        "commit" => {
            let c = event.get("commit");
            for key in ["rev", "operation", "collection", "rkey", "cid"] {
                parts.push(s(c.and_then(|c| c.get(key))));
            }
        }
        "identity" | "account" => {
            let body = event.get(kind.as_str());
            parts.push(s(body.and_then(|b| b.get("seq"))));
            parts.push(s(body.and_then(|b| b.get("time"))));
        }
        _ => parts.push(event.to_string()),
    }
    parts.join("\t")
}

/// One event as a JSON line: the received text, with any raw line breaks (which JSON only
/// allows as whitespace between tokens) turned into spaces so it stays one line.
pub fn jsonl(raw: &str) -> std::borrow::Cow<'_, str> {
    if raw.contains(['\n', '\r']) {
        std::borrow::Cow::Owned(raw.replace(['\n', '\r'], " "))
    } else {
        std::borrow::Cow::Borrowed(raw)
    }
}

/// `2026-07-04T06:13:22.123Z` for a unix-µs time, or the number if out of range.
pub fn format_time_us(time_us: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_us) * 1000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => time_us.to_string(),
    }
}

fn str_of(v: Option<&Value>) -> &str {
    v.and_then(Value::as_str).unwrap_or("")
}

/// One human line for an event.
pub fn pretty(event: &Value) -> String {
    let time = event
        .get("time_us")
        .and_then(Value::as_i64)
        .map(format_time_us)
        .unwrap_or_else(|| "-".repeat(24));
    let did = str_of(event.get("did"));
    let kind = str_of(event.get("kind"));
    let mut line = format!("{time} {did} {kind}");
    match kind {
        "commit" => {
            let c = event.get("commit");
            let get = |k: &str| str_of(c.and_then(|c| c.get(k)));
            let collection = get("collection");
            line.push_str(&format!(
                " {} {}/{}",
                get("operation"),
                collection,
                get("rkey")
            ));
            let record = c.and_then(|c| c.get("record"));
            let summary = match record {
                Some(r) => record_summary(collection, r),
                None if c.and_then(|c| c.get("recordMissing")).is_some() => {
                    "(record missing)".into()
                }
                None if c.and_then(|c| c.get("recordUndecodable")).is_some() => {
                    "(record undecodable)".into()
                }
                None => String::new(),
            };
            if !summary.is_empty() {
                line.push(' ');
                line.push_str(&summary);
            }
        }
        "identity" => {
            let b = event.get("identity");
            let handle = str_of(b.and_then(|b| b.get("handle")));
            if !handle.is_empty() {
                line.push_str(&format!(" handle={handle}"));
            }
        }
        "account" => {
            let b = event.get("account");
            let active = b.and_then(|b| b.get("active")).and_then(Value::as_bool);
            if let Some(active) = active {
                line.push_str(&format!(" active={active}"));
            }
            let status = str_of(b.and_then(|b| b.get("status")));
            if !status.is_empty() {
                line.push_str(&format!(" status={status}"));
            }
        }
        _ => {
            // Anything else (e.g. sluice notices): show the rest compactly.
            let mut rest = event.clone();
            if let Some(map) = rest.as_object_mut() {
                for k in ["did", "time_us", "kind", "cursor"] {
                    map.remove(k);
                }
            }
            line.push(' ');
            line.push_str(&clip(&rest.to_string(), 160));
        }
    }
    line
}

fn record_summary(collection: &str, record: &Value) -> String {
    let field = |k: &str| record.get(k).and_then(Value::as_str);
    let subject_uri = || {
        record
            .get("subject")
            .and_then(|s| s.get("uri").and_then(Value::as_str).or_else(|| s.as_str()))
    };
    match collection {
        "app.bsky.feed.post" => {
            let mut s = format!("{:?}", clip(field("text").unwrap_or(""), 100));
            if record.get("reply").is_some() {
                s.push_str(" (reply)");
            }
            if let Some(embed) = record
                .get("embed")
                .and_then(|e| e.get("$type"))
                .and_then(Value::as_str)
            {
                let short = embed.rsplit('.').next().unwrap_or(embed);
                s.push_str(&format!(" [{short}]"));
            }
            s
        }
        "app.bsky.feed.like" | "app.bsky.feed.repost" => {
            format!("-> {}", subject_uri().unwrap_or("?"))
        }
        "app.bsky.graph.follow" | "app.bsky.graph.block" | "app.bsky.graph.listitem" => {
            format!("-> {}", subject_uri().unwrap_or("?"))
        }
        "app.bsky.actor.profile" => {
            format!("{:?}", clip(field("displayName").unwrap_or(""), 60))
        }
        _ => {
            // A generic record: its first short string field, else its field names.
            let text = ["text", "name", "displayName", "title", "description"]
                .iter()
                .find_map(|k| field(k));
            match (text, record.as_object()) {
                (Some(t), _) => format!("{:?}", clip(t, 80)),
                (None, Some(map)) => {
                    let keys: Vec<&str> = map
                        .keys()
                        .map(String::as_str)
                        .filter(|k| *k != "$type")
                        .take(6)
                        .collect();
                    format!("{{{}}}", keys.join(","))
                }
                (None, None) => clip(&record.to_string(), 80),
            }
        }
    }
}

/// At most `max` characters, on one line, with an ellipsis when cut.
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pretty_lines() {
        let post = json!({"did":"did:plc:a","time_us":1751609602123456i64,"kind":"commit",
            "commit":{"rev":"r","operation":"create","collection":"app.bsky.feed.post","rkey":"3k",
            "record":{"$type":"app.bsky.feed.post","text":"hello\nworld","reply":{},
            "embed":{"$type":"app.bsky.embed.images"}}}});
        assert_eq!(
            pretty(&post),
            "2025-07-04T06:13:22.123Z did:plc:a commit create app.bsky.feed.post/3k \"hello world\" (reply) [images]"
        );
        let like = json!({"did":"did:plc:a","time_us":0,"kind":"commit","commit":{"operation":"create",
            "collection":"app.bsky.feed.like","rkey":"x","record":{"subject":{"uri":"at://u"}}}});
        assert!(pretty(&like).ends_with("app.bsky.feed.like/x -> at://u"));
        let del = json!({"did":"d","time_us":0,"kind":"commit","commit":{"operation":"delete",
            "collection":"app.bsky.feed.post","rkey":"x"}});
        assert!(pretty(&del).ends_with("delete app.bsky.feed.post/x"));
        let ident = json!({"did":"d","time_us":0,"kind":"identity","identity":{"handle":"a.b"}});
        assert!(pretty(&ident).ends_with("identity handle=a.b"));
        let acct =
            json!({"did":"d","kind":"account","account":{"active":false,"status":"takendown"}});
        assert!(pretty(&acct).ends_with("account active=false status=takendown"));
        let odd = json!({"kind":"notice","notice":{"seq":5}});
        assert!(pretty(&odd).contains("notice {\"notice\":{\"seq\":5}}"));
        let generic = json!({"did":"d","time_us":0,"kind":"commit","commit":{"operation":"create",
            "collection":"x.y.z","rkey":"k","record":{"$type":"x.y.z","a":1,"b":2}}});
        assert!(pretty(&generic).ends_with("x.y.z/k {a,b}"));
    }

    #[test]
    fn identities_differ_per_op_and_match_on_replay() {
        let op = |rkey: &str| {
            json!({"did":"d","time_us":5,"kind":"commit",
            "commit":{"rev":"r","operation":"create","collection":"c","rkey":rkey}})
        };
        assert_eq!(identity(&op("a")), identity(&op("a")));
        assert_ne!(identity(&op("a")), identity(&op("b")));
    }

    #[test]
    fn jsonl_stays_one_line() {
        assert_eq!(jsonl("{\"a\":\n1}"), "{\"a\": 1}");
        assert!(matches!(jsonl("{}"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn clips() {
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("ab", 3), "ab");
    }
}
