//! Every error a client can see, and the one place they become responses:
//! `{"error": "<sentence>", "code": "<snake_case>"}` with the status,
//! `WWW-Authenticate`, `Allow` or `Retry-After` that API.md fixes.
//!
//! Internal causes are logged here and never put in a body; client errors
//! (4xx) are not logged as errors.

use std::borrow::Cow;

use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use super::response::json_response;
use super::Body;
use crate::auth::AuthError;
use crate::db::DbError;
use crate::delivery::reader::ReadError;

/// Displayed as the sentence its JSON body carries; a database error keeps
/// its source for the log.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.code_and_message().1)]
pub(crate) enum ApiError {
    BadRequest {
        code: &'static str,
        message: Cow<'static, str>,
    },
    Unauthorized(#[from] AuthError),
    /// The token is valid but names no user.
    UnknownUser,
    NotParticipant,
    NotFound(&'static str),
    MethodNotAllowed(&'static str),
    PayloadTooLarge(u64),
    /// A request head over the size or header-count limit.
    HeadTooLarge,
    UnsupportedMediaType,
    /// An `Expect` with something other than `100-continue`.
    ExpectationFailed,
    /// The cursor cannot be continued on this database.
    CursorReset,
    /// The user is over their write limit (`crate::ratelimit`).
    RateLimited {
        retry_after_s: u32,
    },
    /// The user has this many streams open, the most allowed
    /// (`crate::stream_quota`).
    TooManyStreams(u32),
    /// Over a limit or the database is away: try again later.
    Unavailable {
        message: &'static str,
        retry_after_s: u32,
    },
    Database(#[from] DbError),
    Internal(String),
}

impl ApiError {
    pub(crate) fn bad(code: &'static str, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// A request body that did not arrive within its time limit.
    pub(crate) fn body_timeout() -> ApiError {
        ApiError::bad("body_timeout", "The request body did not arrive in time")
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) | ApiError::UnknownUser => StatusCode::UNAUTHORIZED,
            ApiError::NotParticipant => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::ExpectationFailed => StatusCode::EXPECTATION_FAILED,
            ApiError::CursorReset => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } | ApiError::TooManyStreams(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Database(DbError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Database(DbError::Query(_)) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn code_and_message(&self) -> (&'static str, Cow<'static, str>) {
        match self {
            ApiError::BadRequest { code, message } => (code, message.clone()),
            ApiError::Unauthorized(e) => (e.code(), e.message().into()),
            ApiError::UnknownUser => ("user_not_found", "User not found".into()),
            ApiError::NotParticipant => ("not_a_participant", "Not a participant".into()),
            ApiError::NotFound(what) => ("not_found", (*what).into()),
            ApiError::MethodNotAllowed(_) => ("method_not_allowed", "Method not allowed".into()),
            ApiError::PayloadTooLarge(max) => (
                "payload_too_large",
                format!("Request body is larger than {max} bytes").into(),
            ),
            ApiError::HeadTooLarge => ("headers_too_large", "The request head is too large".into()),
            ApiError::UnsupportedMediaType => (
                "unsupported_media_type",
                "Request body must be JSON (Content-Type: application/json)".into(),
            ),
            ApiError::ExpectationFailed => (
                "expectation_failed",
                "The only expectation supported is Expect: 100-continue".into(),
            ),
            ApiError::CursorReset => (
                "cursor_reset",
                "This cursor cannot be continued on this database; start again without `since`"
                    .into(),
            ),
            ApiError::RateLimited { retry_after_s } => (
                "rate_limited",
                format!(
                    "Sending too fast; try again in {retry_after_s} second{}",
                    if *retry_after_s == 1 { "" } else { "s" }
                )
                .into(),
            ),
            ApiError::TooManyStreams(max) => (
                "too_many_streams",
                format!(
                    "This user has {max} event streams open, the most allowed; close one first"
                )
                .into(),
            ),
            ApiError::Unavailable { message, .. } => ("unavailable", (*message).into()),
            ApiError::Database(DbError::Unavailable(_)) => (
                "database_unavailable",
                "The database is unavailable; try again shortly".into(),
            ),
            ApiError::Database(DbError::Query(_)) | ApiError::Internal(_) => {
                ("internal_error", "Internal server error".into())
            }
        }
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let status = self.status();
        match &self {
            ApiError::Database(e) => tracing::error!(error = %e, "database error"),
            ApiError::Internal(e) => tracing::error!(error = %e, "internal error"),
            _ => {}
        }
        let (code, message) = self.code_and_message();
        let body = serde_json::json!({ "error": message, "code": code });
        let mut resp = json_response(status, body.to_string());
        let h = resp.headers_mut();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            ApiError::Unauthorized(_) | ApiError::UnknownUser => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"api\""),
                );
            }
            ApiError::MethodNotAllowed(allow) => {
                h.insert(ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unavailable { retry_after_s, .. }
            | ApiError::RateLimited { retry_after_s } => {
                h.insert(RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ApiError::Database(DbError::Unavailable(_)) => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
            }
            // A place frees when another of the user's streams ends, which
            // hark cannot foresee: a retry soon, not at once.
            ApiError::TooManyStreams(_) => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("10"));
            }
            _ => {}
        }
        resp
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::CursorReset => ApiError::CursorReset,
            ReadError::Db(e) => ApiError::Database(e),
        }
    }
}
