//! The operator credential of the console: a bearer token
//! (`Authorization: Bearer <ORDERFLOW_OPERATOR_TOKEN>`), compared in constant
//! time (SHA-256 digests of both, compared byte by byte without an early
//! exit, so neither the length nor the first differing byte shows in the
//! time an answer takes). No token configured: the operator side is off.
//! 401 without a bearer token, 403 with another one.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::error::error_body;
use crate::http::AppState;

/// The realm of the console's `WWW-Authenticate` challenge.
const REALM: &str = "Bearer realm=\"orderflow operator console\"";

/// The digest of the configured token.
#[derive(Clone)]
pub struct OperatorToken([u8; 32]);

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorToken(..)")
    }
}

impl OperatorToken {
    pub fn new(token: &SecretString) -> Self {
        Self(Sha256::digest(token.expose_secret().as_bytes()).into())
    }

    /// Whether `presented` is the token, in time independent of both.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0
            .iter()
            .zip(presented)
            .fold(0_u8, |difference, (a, b)| difference | (a ^ b))
            == 0
    }
}

/// The bearer token of `headers`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Middleware of every operator route: 403 when the console's operator side
/// is off or the token is another, 401 without a token.
pub async fn operator_only(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(operator) = &state.operator else {
        return error_body(
            StatusCode::FORBIDDEN,
            "the operator console is off on this server: set ORDERFLOW_OPERATOR_TOKEN for the \
             order API (`orderflow up` prints a development token)",
        );
    };
    match bearer(request.headers()) {
        None => {
            let mut response = error_body(
                StatusCode::UNAUTHORIZED,
                "an operator token is needed: send `Authorization: Bearer <token>` with the \
                 token of ORDERFLOW_OPERATOR_TOKEN",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
            response
        }
        Some(token) if operator.token.accepts(token) => next.run(request).await,
        Some(_) => {
            tracing::warn!(
                path = %request.uri().path(),
                "console request with a wrong operator token refused"
            );
            error_body(
                StatusCode::FORBIDDEN,
                "this operator token is not the one the server is configured with \
                 (ORDERFLOW_OPERATOR_TOKEN)",
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_token_is_accepted() {
        let token = OperatorToken::new(&SecretString::from("operator-token-0123456789"));
        assert!(token.accepts("operator-token-0123456789"));
        assert!(!token.accepts("operator-token-012345678"));
        assert!(!token.accepts(""));
        assert!(!format!("{token:?}").contains("operator"));
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&headers), None);
    }
}
