//! Cross-origin access: which browser origins may call hark, on every
//! response (the event stream included), and the answer to preflights.

use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ALLOW,
    VARY,
};
use hyper::{Response, StatusCode};

use super::response::full;
use super::Body;

/// The allowed origins (`HARK_CORS_ORIGINS`).
#[derive(Clone)]
pub(crate) struct Cors {
    any: bool,
    origins: Vec<String>,
}

impl Cors {
    /// `None`: no cross-origin access. `*`: any origin. Otherwise a
    /// comma-separated list compared exactly (scheme, host and port).
    pub(crate) fn new(spec: Option<&str>) -> Cors {
        let spec = spec.unwrap_or("").trim();
        Cors {
            any: spec == "*",
            origins: spec
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty() && o != "*")
                .collect(),
        }
    }

    fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let origin = origin?;
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| o == text)
            .then(|| origin.clone())
    }

    /// Adds the CORS headers a response to `origin` should carry.
    pub(crate) fn apply(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if !self.any && !self.origins.is_empty() {
            headers.append(VARY, HeaderValue::from_static("Origin"));
        }
        if let Some(allowed) = self.allow(origin) {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
            headers.insert(
                ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("Retry-After, WWW-Authenticate"),
            );
        }
    }

    /// The answer to `OPTIONS` on a known path: a preflight when the
    /// browser asks for one (the origin headers are added by `apply`),
    /// otherwise the methods the path allows.
    pub(crate) fn preflight(
        &self,
        allow: &'static str,
        origin: Option<&HeaderValue>,
    ) -> Response<Body> {
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(ALLOW, HeaderValue::from_static(allow));
        if self.allow(origin).is_some() {
            h.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(allow),
            );
            h.insert(
                ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(
                    "Authorization, Content-Type, Last-Event-ID, Cache-Control, X-CSRFToken, X-Requested-With",
                ),
            );
            h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none = Cors::new(None);
        let mut h = HeaderMap::new();
        none.apply(Some(&HeaderValue::from_static("https://a.example")), &mut h);
        assert!(h.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());

        let list = Cors::new(Some("https://a.example, http://localhost:3000/"));
        let mut h = HeaderMap::new();
        list.apply(
            Some(&HeaderValue::from_static("http://localhost:3000")),
            &mut h,
        );
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "http://localhost:3000");
        let mut h = HeaderMap::new();
        list.apply(
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut h,
        );
        assert!(h.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        assert_eq!(h[VARY], "Origin");

        let any = Cors::new(Some("*"));
        let mut h = HeaderMap::new();
        any.apply(None, &mut h);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    }
}
