//! GET /events — the Server-Sent Events stream (in progress).

use hyper::body::Incoming;
use hyper::{Request, Response};

use super::error::ApiError;
use super::Body;
use crate::app::App;

pub async fn events(_app: &App, _req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    Err(ApiError::NotFound("Not found"))
}
