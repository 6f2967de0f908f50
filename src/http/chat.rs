//! The chat endpoints: typing, rooms list and detail, the read marker and
//! sending a message. The three writes spend the user's write limit
//! ([`crate::ratelimit`]) right after authentication: before the body is
//! parsed or the database is asked anything, so a refused write costs
//! little.

use std::sync::atomic::Ordering::Relaxed;

use hyper::{Request, Response, StatusCode};
use serde_json::Value;

use super::error::ApiError;
use super::request::{authenticate, discard_body, query_pairs, read_json, ReqBody};
use super::response::json_response;
use super::shared::Shared;
use super::Body;
use crate::db::{messages, rooms};
use crate::delivery::directory::Access;
use crate::message::Message;

/// 404 for an unknown room, 403 for a non-participant.
pub(crate) async fn require_participant(
    app: &Shared,
    room: i64,
    user: i64,
) -> Result<(), ApiError> {
    match app.directory.access(room, user).await? {
        Access::Participant => Ok(()),
        Access::NotParticipant => Err(ApiError::NotParticipant),
        Access::NoSuchRoom => Err(ApiError::NotFound("Room not found")),
    }
}

/// After a read that returned a page for `user` in `room`: Ok while the
/// user may still read the room. `member` is what the database said in the
/// read's own snapshot (a page read there), None for a page from the hub's
/// memory — whose rows a catch-up added only after invalidating the
/// directory for any loss of access that committed before them, so the
/// directory's answer covers them. Otherwise 401 for a user who is gone,
/// 404 for a room that is gone, 403 for one who left (asked of the
/// database, whatever the cache holds: the NOTIFYs that would clear it may
/// still be on their way). A user who is back in the room by then may read
/// what the page holds: they are a participant as of a snapshot that sees it.
pub(crate) async fn require_still_participant(
    app: &Shared,
    room: i64,
    user: i64,
    member: Option<bool>,
) -> Result<(), ApiError> {
    let allowed = match member {
        Some(m) => m,
        None => app.directory.access(room, user).await? == Access::Participant,
    };
    if allowed {
        return Ok(());
    }
    if app.directory.user_fresh(user).await?.is_none() {
        return Err(ApiError::UnknownUser);
    }
    match app.directory.access_fresh(room, user).await? {
        Access::Participant => Ok(()),
        Access::NotParticipant => Err(ApiError::NotParticipant),
        Access::NoSuchRoom => Err(ApiError::NotFound("Room not found")),
    }
}

/// Spends one of `user`'s writes, or refuses with 429 and `Retry-After`.
fn spend_write(app: &Shared, user: i64) -> Result<(), ApiError> {
    app.write_limit.check(user).map_err(|wait| {
        app.metrics.rate_limited.fetch_add(1, Relaxed);
        ApiError::RateLimited {
            retry_after_s: wait.whole_seconds(),
        }
    })
}

/// [`spend_write`], then the JSON body. A refused write's body is read
/// and dropped all the same (free on the lean connection, which has read
/// it already), so that the connection carries the client's next request.
async fn spend_write_then_read<B: ReqBody>(
    app: &Shared,
    user: i64,
    req: Request<B>,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    if let Err(e) = spend_write(app, user) {
        discard_body(app, req).await;
        return Err(e);
    }
    read_json(app, req).await
}

fn ok_json(status: StatusCode, v: &impl serde::Serialize) -> Result<Response<Body>, ApiError> {
    let body = serde_json::to_vec(v).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut resp = json_response(status, body);
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}

/// POST /api/chat/rooms/{id}/typing/
pub(crate) async fn typing<B: ReqBody>(
    app: &Shared,
    req: Request<B>,
    room: i64,
) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(&req);
    let user = authenticate(app, &req, &pairs).await?;
    let body = spend_write_then_read(app, user.id, req).await?;
    // Missing is false; anything but a boolean, null included, is refused
    // (as DRF's BooleanField without allow_null does).
    let on = match body.get("is_typing") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad(
                "invalid_is_typing",
                "is_typing must be a boolean",
            ))
        }
    };
    require_participant(app, room, user.id).await?;
    app.typing.set(room, user.id, on).await?;
    ok_json(
        StatusCode::OK,
        &serde_json::json!({"success": true, "message": "Typing status updated"}),
    )
}

/// GET /api/chat/rooms/ and /api/chat/rooms/{id}/
pub(crate) async fn rooms(
    app: &Shared,
    req: Request<()>,
    only: Option<i64>,
) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(&req);
    let user = authenticate(app, &req, &pairs).await?;
    if let Some(room) = only {
        require_participant(app, room, user.id).await?;
    }
    let client = app.pool.get().await.map_err(crate::db::DbError::from)?;
    let mut list = rooms::list(&client, user.id, only).await?;
    match only {
        None => ok_json(StatusCode::OK, &list),
        Some(room) => match list.pop() {
            Some(r) => ok_json(StatusCode::OK, &r),
            // Left the room, or it went away, between the check (maybe
            // from the cache) and the read: the database says which.
            None => {
                drop(client);
                require_still_participant(app, room, user.id, Some(false)).await?;
                Err(ApiError::NotParticipant)
            }
        },
    }
}

/// POST /api/chat/rooms/{id}/read/
pub(crate) async fn mark_read(
    app: &Shared,
    req: Request<()>,
    room: i64,
) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(&req);
    let user = authenticate(app, &req, &pairs).await?;
    spend_write(app, user.id)?;
    require_participant(app, room, user.id).await?;
    let client = app.pool.get().await.map_err(crate::db::DbError::from)?;
    rooms::mark_read(&client, room, user.id).await?;
    ok_json(StatusCode::OK, &serde_json::json!({"success": true}))
}

/// A JSON number written with a fraction of zero (`7.0`, `7e0`) as the
/// whole number it is: JSON Schema's `integer` admits it, and so do DRF's
/// id fields. Only where every whole number is exact (2^53), so that no
/// neighbouring id is ever read for it.
fn whole_float(n: &serde_json::Number) -> Option<i64> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    n.as_f64()
        .filter(|f| f.fract() == 0.0 && f.abs() <= EXACT)
        .map(|f| f as i64)
}

/// POST /api/chat/messages/
pub(crate) async fn send_message<B: ReqBody>(
    app: &Shared,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(&req);
    let user = authenticate(app, &req, &pairs).await?;
    let body = spend_write_then_read(app, user.id, req).await?;
    let invalid_room = || ApiError::bad("invalid_room_id", "room_id must be a positive integer");
    let room = match body.get("room_id").or_else(|| body.get("room")) {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| whole_float(n))
            .filter(|&r| r > 0)
            .ok_or_else(invalid_room)?,
        // A string of digits too, as DRF's primary-key fields accept it
        // (form-minded clients send ids as strings).
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<i64>()
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(invalid_room)?,
        None | Some(Value::Null) => {
            return Err(ApiError::bad("invalid_room_id", "room_id is required"))
        }
        Some(_) => return Err(invalid_room()),
    };
    let content = match body.get("content") {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => {
            return Err(ApiError::bad("invalid_content", "content is required"))
        }
        Some(_) => return Err(ApiError::bad("invalid_content", "content must be a string")),
    };
    if content.trim().is_empty() {
        return Err(ApiError::bad("invalid_content", "content may not be blank"));
    }
    if content.contains('\0') {
        return Err(ApiError::bad(
            "invalid_content",
            "content may not contain NUL characters",
        ));
    }
    let max = app.config.max_content_chars as usize;
    if content.chars().count() > max {
        return Err(ApiError::bad(
            "invalid_content",
            format!("content may have at most {max} characters"),
        ));
    }
    require_participant(app, room, user.id).await?;
    let client = app.pool.get().await.map_err(crate::db::DbError::from)?;
    let (id, created_at) = messages::send(&client, room, user.id, content).await?;
    // As if its NOTIFY had arrived: until a catch-up has read the row, a
    // poll of the room that must answer at once asks the database, so the
    // sender's next poll sees what it just sent.
    app.hub.message_notified(room);
    let msg = Message {
        id,
        room,
        sender: (*user).clone(),
        content: content.to_string(),
        created_at,
        edited: false,
    };
    ok_json(StatusCode::CREATED, &msg)
}

#[cfg(test)]
mod tests {
    use super::whole_float;

    #[test]
    fn whole_floats_are_ids_and_fractions_are_not() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).unwrap();
        assert_eq!(whole_float(&n("524287.0")), Some(524_287));
        assert_eq!(whole_float(&n("7e0")), Some(7));
        assert_eq!(
            whole_float(&n("9007199254740992.0")),
            Some(9_007_199_254_740_992)
        );
        for bad in ["1.5", "9007199254740994.0", "1e300", "-1e300", "1e-3"] {
            assert_eq!(whole_float(&n(bad)), None, "{bad}");
        }
    }
}
