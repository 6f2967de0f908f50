//! `GET /openapi.json`: the OpenAPI 3.1 description of hark's HTTP API.
//!
//! The document is `docs/openapi.json`, compiled in. The file carries the
//! default limits; [`document`] writes this process's configured ones in
//! their place once, at start, so a client (or a fuzzer) reads the bounds
//! the server it talks to enforces, and requests serve the same bytes.

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use serde_json::{json, Value};

use super::response::full;
use super::shared::Shared;
use super::{poll, Body};
use crate::config::Config;

/// `docs/openapi.json` as it is in the repository.
pub(crate) const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// The document with `config`'s limits in it, serialised. An error means
/// the compiled-in file lost a place a limit goes (a unit test keeps it).
pub(crate) fn document(config: &Config) -> Result<Bytes, String> {
    let mut doc: Value = serde_json::from_str(DOCUMENT)
        .map_err(|e| format!("docs/openapi.json does not parse: {e}"))?;
    let timeout_default = poll::default_timeout(config);
    let limit_default = poll::default_limit(config);
    let limits = [
        (
            "/components/parameters/PollTimeout/schema/maximum",
            json!(config.poll_timeout_max_s),
        ),
        (
            "/components/parameters/PollTimeout/schema/default",
            json!(timeout_default),
        ),
        (
            "/components/parameters/PollLimit/schema/maximum",
            json!(config.poll_limit_max),
        ),
        (
            "/components/parameters/PollLimit/schema/default",
            json!(limit_default),
        ),
        (
            "/components/schemas/SendMessageRequest/properties/content/maxLength",
            json!(config.max_content_chars),
        ),
        (
            "/info/x-hark-limits/poll_timeout_default_s",
            json!(timeout_default),
        ),
        (
            "/info/x-hark-limits/poll_timeout_max_s",
            json!(config.poll_timeout_max_s),
        ),
        (
            "/info/x-hark-limits/poll_limit_max",
            json!(config.poll_limit_max),
        ),
        (
            "/info/x-hark-limits/max_content_chars",
            json!(config.max_content_chars),
        ),
        (
            "/info/x-hark-limits/max_body_bytes",
            json!(config.max_body_bytes),
        ),
        ("/info/version", json!(env!("CARGO_PKG_VERSION"))),
    ];
    for (pointer, value) in limits {
        let slot = doc
            .pointer_mut(pointer)
            .ok_or_else(|| format!("docs/openapi.json has no {pointer}"))?;
        *slot = value;
    }
    serde_json::to_vec_pretty(&doc)
        .map(Bytes::from)
        .map_err(|e| format!("cannot serialise the OpenAPI document: {e}"))
}

/// The document built at start. It changes only when hark restarts (with
/// other limits, or upgraded), so caches may keep it briefly; it names no
/// user, so shared caches too.
pub(crate) fn openapi(app: &Shared) -> Response<Body> {
    let mut resp = Response::new(full(app.openapi.clone()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn served(args: &[&str]) -> Value {
        let config = Config::try_parse_from(
            std::iter::once("hark")
                .chain(["--database-url", "postgres://localhost/x"])
                .chain(args.iter().copied()),
        )
        .expect("config");
        serde_json::from_slice(&document(&config).expect("document")).expect("JSON")
    }

    #[test]
    fn the_file_carries_the_defaults() {
        let file: Value = serde_json::from_str(DOCUMENT).expect("docs/openapi.json parses");
        let mut served = served(&[]);
        // The version is the crate's, whatever the file says.
        served["info"]["version"] = file["info"]["version"].clone();
        assert_eq!(served, file, "docs/openapi.json is not at the defaults");
    }

    #[test]
    fn the_served_document_states_the_configured_limits() {
        let doc = served(&[
            "--poll-timeout-max-s",
            "7",
            "--poll-timeout-default-s",
            "30",
            "--poll-limit-max",
            "50",
            "--max-content-chars",
            "300",
            "--max-body-bytes",
            "4096",
        ]);
        let param = |name: &str| &doc["components"]["parameters"][name]["schema"];
        assert_eq!(param("PollTimeout")["maximum"], 7);
        // A default over the maximum is clamped, as the poll clamps it.
        assert_eq!(param("PollTimeout")["default"], 7);
        assert_eq!(param("PollLimit")["maximum"], 50);
        assert_eq!(param("PollLimit")["default"], 50);
        assert_eq!(
            doc["components"]["schemas"]["SendMessageRequest"]["properties"]["content"]
                ["maxLength"],
            300
        );
        assert_eq!(
            doc["info"]["x-hark-limits"],
            json!({
                "poll_timeout_default_s": 7,
                "poll_timeout_max_s": 7,
                "poll_limit_max": 50,
                "max_content_chars": 300,
                "max_body_bytes": 4096,
                "max_rooms_per_stream": super::super::events::MAX_ROOMS,
            })
        );
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    }
}
