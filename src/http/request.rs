//! What handlers read from a request: the query, the requester, a JSON
//! body within its limits; and the small JSON responses they build.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Request;

use super::error::ApiError;
use super::shared::Shared;
use crate::auth::AuthError;
use crate::message::User;

/// A request body as the handlers that read one take it: hyper's
/// `Incoming`, or the lean connection's `Full` (the body read whole).
pub(crate) trait ReqBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + Sync
    + 'static
{
}

impl<T> ReqBody for T where
    T: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Sync
        + 'static
{
}

/// Time a client has to send a request body once its head arrived.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The query string as decoded pairs (`+` is a space, as forms encode it).
pub(crate) fn query_pairs<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.uri().query().map(decode_query).unwrap_or_default()
}

/// `form_urlencoded::parse`, owned, with a fast path for a query with
/// nothing to decode: ids, cursors and tokens are URL-safe, and decoding
/// a poll's query (a JWT among it) through `form_urlencoded` was 7% of
/// hark's CPU on the hot path (0.8% this way).
fn decode_query(q: &str) -> Vec<(String, String)> {
    if memchr::memchr2(b'%', b'+', q.as_bytes()).is_some() {
        return form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    }
    q.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

pub(crate) fn query_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The requester: a valid token naming an existing user.
pub(crate) async fn authenticate<B>(
    app: &Shared,
    req: &Request<B>,
    pairs: &[(String, String)],
) -> Result<Arc<User>, ApiError> {
    authenticate_until(app, req, pairs)
        .await
        .map(|(user, _)| user)
}

/// [`authenticate`], with the last second (Unix time) in which the token
/// is accepted: an event stream ends when it passes.
pub(crate) async fn authenticate_until<B>(
    app: &Shared,
    req: &Request<B>,
    pairs: &[(String, String)],
) -> Result<(Arc<User>, i64), ApiError> {
    let (id, exp) = token_claims(app, req, pairs)?;
    let user = app.directory.user(id).await?.ok_or(ApiError::UnknownUser)?;
    Ok((user, exp))
}

/// The user id and expiry (Unix seconds) of the request's token, from the
/// Authorization header or else `access_token`: checked, not yet looked up.
pub(crate) fn token_claims<B>(
    app: &Shared,
    req: &Request<B>,
    pairs: &[(String, String)],
) -> Result<(i64, i64), ApiError> {
    let token = match req.headers().get(AUTHORIZATION) {
        Some(h) => {
            let h = h.to_str().map_err(|_| AuthError::Invalid)?;
            let (scheme, token) = h.split_once(' ').ok_or(AuthError::Invalid)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Invalid.into());
            }
            token.trim()
        }
        None => query_get(pairs, "access_token")
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?,
    };
    Ok(app.auth.verify_until(token)?)
}

/// The body length a request's Content-Length declares, when it is a
/// plain number.
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a JSON object body within the size limit. A missing Content-Type
/// is read as JSON; another explicit type is a 415; an empty body is `{}`.
pub(crate) async fn read_json<B: ReqBody>(
    app: &Shared,
    req: Request<B>,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let max = app.config.max_body_bytes;
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        let json = mime.eq_ignore_ascii_case("application/json")
            || (mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    if declared_length(&req).is_some_and(|n| n > max) {
        return Err(ApiError::PayloadTooLarge(max));
    }
    let limited = Limited::new(req.into_body(), max as usize);
    let bytes = match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Err(_) => return Err(ApiError::body_timeout()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::PayloadTooLarge(max))
        }
        Ok(Err(_)) => {
            return Err(ApiError::bad(
                "invalid_body",
                "The request body could not be read",
            ))
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    // No body at all is an empty object, as DRF reads it: a bare
    // `POST …/typing/` means `is_typing` missing, i.e. false.
    if bytes.is_empty() {
        return Ok(serde_json::Map::new());
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "invalid_json",
            "The request body must be a JSON object",
        ));
    }
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad(
            "invalid_json",
            "The request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad(
            "invalid_json",
            format!("Malformed JSON: {e}"),
        )),
    }
}

/// Reads a request body and drops it, within `read_json`'s limits, for a
/// request refused before its body was needed: hyper closes a connection
/// whose request body was left unread unless all of it had already
/// arrived, and without saying so, so a client's next request on it would
/// fail. A body over the limit or too slow is left: then the connection
/// closes, as it does after a 413.
pub(crate) async fn discard_body<B: ReqBody>(app: &Shared, req: Request<B>) {
    let mut left = app.config.max_body_bytes;
    if declared_length(&req).is_some_and(|n| n > left) {
        return;
    }
    let mut body = std::pin::pin!(req.into_body());
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            let len = frame.data_ref().map_or(0, |d| d.len() as u64);
            match left.checked_sub(len) {
                Some(l) => left = l,
                None => return,
            }
        }
    };
    let _ = tokio::time::timeout(BODY_READ_TIMEOUT, drain).await;
}

#[cfg(test)]
mod tests {
    use super::decode_query;

    #[test]
    fn the_query_fast_path_decodes_as_form_urlencoded_does() {
        for q in [
            "",
            "room_id=1&since=AcZ1BLVELBFrAQAAAADcBQAA&access_token=eyJ.a-b_c.d",
            "a=1&&b=2&",
            "flag&x=&=y&k==v=",
            "since=2026-01-15T10:00:00%2B02:00&room_id=3",
            "q=a+b&r=%E2%9C%93&bad=%ZZ&lossy=%FF",
        ] {
            let want: Vec<(String, String)> =
                form_urlencoded::parse(q.as_bytes()).into_owned().collect();
            assert_eq!(decode_query(q), want, "{q:?}");
        }
    }
}
