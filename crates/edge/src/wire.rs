//! Errors hyper answers on its own, before any handler runs, in the API's shape.
//!
//! A request whose head cannot be parsed (a malformed request line or header, a header
//! section larger than hyper's buffer, a URI too long) never reaches the router: hyper
//! answers it itself with a bare `400`, `431` or `414` and no body. Clients of an
//! OpenAI-compatible server expect every error as `{"error": {...}}`, so the fronts serve
//! through [`JsonParseErrors`], whose connections rewrite exactly those automatic answers (a
//! status line of one of those codes, `connection: close`, `content-length: 0`, nothing
//! else) into the same status with the error object as body. Every other byte passes
//! through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ApiError, Refusal};

/// The most bytes of header fields (names, values and separators) a request may carry.
/// Hyper's own limit is its read buffer (about 400 KiB); beyond this one the fronts answer
/// 431 with the error object.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Middleware: a request whose header fields exceed [`MAX_HEADER_BYTES`] gets a 431.
pub async fn header_limit(req: Request, next: Next) -> Response {
    let bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return ApiError::Refused(Box::new(Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            kind: "invalid_request_error",
            code: Some("request_header_fields_too_large"),
            param: None,
            message: format!(
                "The request's header fields are {bytes} bytes, more than the limit of \
                 {MAX_HEADER_BYTES}"
            ),
            retry_after_s: None,
        }))
        .into_response();
    }
    next.run(req).await
}

/// A listener whose connections answer hyper's own parse errors with a JSON body.
#[derive(Debug)]
pub struct JsonParseErrors<L>(pub L);

impl<L: Listener> Listener for JsonParseErrors<L>
where
    L::Io: Unpin,
{
    type Io = ParseErrorBodies<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.0.accept().await;
        (ParseErrorBodies::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// One connection of [`JsonParseErrors`].
#[derive(Debug)]
pub struct ParseErrorBodies<T> {
    inner: T,
    /// A rewritten answer being written: its bytes, how many are written, and the length of
    /// the write it replaces (reported once all is written).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> ParseErrorBodies<T> {
    /// Wraps a connection.
    pub fn new(inner: T) -> Self {
        ParseErrorBodies {
            inner,
            pending: None,
        }
    }
}

/// The longest automatic answer hyper writes (a status line, three headers).
const MAX_AUTOMATIC_ANSWER: usize = 256;

/// The JSON answer replacing `head` when it is one of hyper's bodiless parse-error answers.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    if head.len() > MAX_AUTOMATIC_ANSWER {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let (status, message, code) = match rest.get(..4)? {
        "400 " => (
            StatusCode::BAD_REQUEST,
            "The request could not be parsed as HTTP/1.1 (a malformed request line or header)",
            "malformed_request",
        ),
        "431 " => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "The request's header fields are too large",
            "request_header_fields_too_large",
        ),
        "414 " => (
            StatusCode::URI_TOO_LONG,
            "The request's URI is too long",
            "uri_too_long",
        ),
        _ => return None,
    };
    let (_, headers) = text.split_once("\r\n")?;
    let headers = headers.strip_suffix("\r\n\r\n")?;
    let mut date = None;
    let mut closes = false;
    let mut empty = false;
    for line in headers.split("\r\n") {
        let (name, value) = line.split_once(": ")?;
        match name.to_ascii_lowercase().as_str() {
            "connection" if value.eq_ignore_ascii_case("close") => closes = true,
            "content-length" if value == "0" => empty = true,
            "date" => date = Some(value),
            // Anything else: not hyper's automatic answer.
            _ => return None,
        }
    }
    if !(closes && empty) {
        return None;
    }
    let error = ApiError::Refused(Box::new(Refusal {
        status,
        kind: "invalid_request_error",
        code: Some(code),
        param: None,
        message: message.to_owned(),
        retry_after_s: None,
    }));
    let body = serde_json::to_vec(&error.body()).ok()?;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(date) = date {
        out.push_str(&format!("date: {date}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

impl<T: AsyncRead + Unpin> AsyncRead for ParseErrorBodies<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParseErrorBodies<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match rewrite(buf) {
                Some(answer) => this.pending = Some((answer, 0, buf.len())),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        // Hyper calls again with the same bytes until the write is reported done.
        while let Some((answer, written, _)) = &mut this.pending {
            if *written == answer.len() {
                break;
            }
            match ready!(Pin::new(&mut this.inner).poll_write(cx, &answer[*written..])) {
                Ok(0) => {
                    this.pending = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => *written += n,
                Err(err) => {
                    this.pending = None;
                    return Poll::Ready(Err(err));
                }
            }
        }
        let replaced = this.pending.take().map_or(0, |(_, _, len)| len);
        Poll::Ready(Ok(replaced))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Vectored writes are flattened by hyper into one buffer, so an automatic answer is
    // always seen whole by `poll_write`.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "date: Sat, 05 Dec 2026 00:58:10 GMT";

    #[test]
    fn hypers_automatic_answers_get_the_error_object() {
        for (status, code) in [
            (400, "malformed_request"),
            (431, "request_header_fields_too_large"),
            (414, "uri_too_long"),
        ] {
            let reason = StatusCode::from_u16(status)
                .unwrap()
                .canonical_reason()
                .unwrap();
            let bare = format!(
                "HTTP/1.1 {status} {reason}\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"
            );
            let answer = String::from_utf8(rewrite(bare.as_bytes()).unwrap()).unwrap();
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")));
            assert!(head.contains("content-type: application/json"));
            assert!(head.contains(DATE));
            assert!(head.contains(&format!("content-length: {}", body.len())));
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["error"]["code"], code);
            assert_eq!(json["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn other_writes_pass_untouched() {
        for write in [
            // A handler's 400 has a body and a content type.
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                .to_owned(),
            // An empty 200, a 404 that keeps the connection, a body chunk.
            format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"),
            format!("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"),
            "data: {\"choices\":[]}\n\n".to_owned(),
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\nx-other: 1\r\n\r\n"
                .to_owned(),
        ] {
            assert!(rewrite(write.as_bytes()).is_none(), "{write}");
        }
    }
}
