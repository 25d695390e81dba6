//! Where `sluice tail` connects: turns what an operator types (`localhost:6008`,
//! `jetstream2.us-east.bsky.network`, `https://host/subscribe?compress=false`) into a
//! Jetstream v1 `/subscribe` URL with the filter and cursor query parameters.
//!
//! Owns the parameter names and the client-side limits Jetstream v1 documents. Must never
//! drop a parameter the operator wrote into the URL other than the ones it sets itself.

use anyhow::{bail, Context};

/// Jetstream v1 accepts at most this many `wantedCollections`.
pub const MAX_COLLECTIONS: usize = 100;
/// Jetstream v1 accepts at most this many `wantedDids`.
pub const MAX_DIDS: usize = 10_000;

/// Parameters `sluice tail` sets itself; copies already in the URL are replaced.
const OWN_PARAMS: [&str; 4] = ["wantedCollections", "wantedDids", "cursor", "notices"];

/// The base URL: scheme defaulted, path defaulted to `/subscribe`, no parameters of ours.
///
/// Without a scheme, a loopback host or an explicit port means plain `ws://` (a local
/// sluice), anything else `wss://` (a public Jetstream). `http`/`https` map to `ws`/`wss`.
pub fn base_url(input: &str) -> anyhow::Result<url::Url> {
    let input = input.trim();
    if input.is_empty() {
        bail!("--url is empty");
    }
    let with_scheme = if input.contains("://") {
        input.to_string()
    } else {
        let authority = input.split(['/', '?']).next().unwrap_or(input);
        let host = authority
            .rsplit_once(':')
            .filter(|(h, port)| !h.ends_with(':') && port.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h)
            .unwrap_or(authority);
        let has_port = host.len() != authority.len();
        let loopback = matches!(
            host.trim_start_matches('[').trim_end_matches(']'),
            "localhost" | "127.0.0.1" | "::1"
        ) || host.starts_with("127.");
        let scheme = if loopback || has_port { "ws" } else { "wss" };
        format!("{scheme}://{input}")
    };
    let mut url =
        url::Url::parse(&with_scheme).with_context(|| format!("invalid --url {input:?}"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => bail!("--url scheme must be ws, wss, http or https, not {other:?}"),
    };
    if url.scheme() != scheme && url.set_scheme(scheme).is_err() {
        bail!("cannot use {scheme}:// for --url {input:?}");
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("--url {input:?} has no host");
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/subscribe");
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !OWN_PARAMS.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    if !kept.is_empty() {
        url.query_pairs_mut().extend_pairs(kept);
    }
    Ok(url)
}

/// Checks filters the way a Jetstream server would, so a typo fails fast with a clear
/// message instead of a reconnect loop.
pub fn check_filters(collections: &[String], dids: &[String]) -> anyhow::Result<()> {
    if collections.len() > MAX_COLLECTIONS {
        bail!(
            "{} --collection filters; Jetstream accepts at most {MAX_COLLECTIONS}",
            collections.len()
        );
    }
    if dids.len() > MAX_DIDS {
        bail!(
            "{} --did filters; Jetstream accepts at most {MAX_DIDS}",
            dids.len()
        );
    }
    for c in collections {
        let stem = c.strip_suffix(".*").unwrap_or(c);
        let ok = !stem.is_empty()
            && !stem.contains('*')
            && stem.split('.').all(|seg| {
                !seg.is_empty()
                    && seg
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
            });
        if !ok {
            bail!(
                "--collection {c:?} is not an NSID (app.bsky.feed.post) or a prefix (app.bsky.*)"
            );
        }
    }
    for d in dids {
        let mut parts = d.splitn(3, ':');
        let ok = parts.next() == Some("did")
            && parts.next().is_some_and(|m| !m.is_empty())
            && parts.next().is_some_and(|id| !id.is_empty())
            && !d.chars().any(char::is_whitespace);
        if !ok {
            bail!("--did {d:?} is not a DID (did:plc:... or did:web:...)");
        }
    }
    Ok(())
}

/// The URL for one connection attempt.
pub fn subscribe_url(
    base: &url::Url,
    collections: &[String],
    dids: &[String],
    cursor: Option<i64>,
    notices: bool,
) -> url::Url {
    let mut url = base.clone();
    {
        let mut q = url.query_pairs_mut();
        for c in collections {
            q.append_pair("wantedCollections", c);
        }
        for d in dids {
            q.append_pair("wantedDids", d);
        }
        if let Some(cursor) = cursor {
            q.append_pair("cursor", &cursor.to_string());
        }
        if notices {
            q.append_pair("notices", "true");
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_scheme_and_path() {
        let b = |s: &str| base_url(s).unwrap().to_string();
        assert_eq!(b("localhost:6008"), "ws://localhost:6008/subscribe");
        assert_eq!(b("127.0.0.1:6008"), "ws://127.0.0.1:6008/subscribe");
        assert_eq!(b("[::1]:6008"), "ws://[::1]:6008/subscribe");
        assert_eq!(b("relay.example:6008"), "ws://relay.example:6008/subscribe");
        assert_eq!(
            b("jetstream2.us-east.bsky.network"),
            "wss://jetstream2.us-east.bsky.network/subscribe"
        );
        assert_eq!(b("https://js.example/"), "wss://js.example/subscribe");
        assert_eq!(b("http://js.example/custom"), "ws://js.example/custom");
        assert_eq!(
            b("ws://h:1/subscribe?compress=false&cursor=5&wantedDids=did:x:y"),
            "ws://h:1/subscribe?compress=false"
        );
        assert!(base_url("ftp://x").is_err());
        assert!(base_url("").is_err());
    }

    #[test]
    fn builds_query() {
        let base = base_url("ws://h:1/subscribe?compress=false").unwrap();
        let url = subscribe_url(
            &base,
            &["app.bsky.feed.post".into(), "app.bsky.graph.*".into()],
            &["did:plc:abc".into()],
            Some(1_700_000_000_000_000),
            false,
        );
        assert_eq!(
            url.as_str(),
            "ws://h:1/subscribe?compress=false&wantedCollections=app.bsky.feed.post\
             &wantedCollections=app.bsky.graph.*&wantedDids=did%3Aplc%3Aabc\
             &cursor=1700000000000000"
        );
        let bare = subscribe_url(&base_url("ws://h:1").unwrap(), &[], &[], None, false);
        assert_eq!(bare.as_str(), "ws://h:1/subscribe");
    }

    #[test]
    fn checks_filters() {
        assert!(check_filters(&["app.bsky.feed.post".into(), "app.*".into()], &[]).is_ok());
        assert!(check_filters(&["*".into()], &[]).is_err());
        assert!(check_filters(&["app.*.post".into()], &[]).is_err());
        assert!(check_filters(&["app..post".into()], &[]).is_err());
        assert!(check_filters(&[], &["did:plc:abc".into(), "did:web:a.b".into()]).is_ok());
        assert!(check_filters(&[], &["plc:abc".into()]).is_err());
        assert!(check_filters(&[], &["did:plc:".into()]).is_err());
        let many: Vec<String> = (0..101).map(|i| format!("a.b{i}")).collect();
        assert!(check_filters(&many, &[]).is_err());
    }
}
