//! HTTP/1.1 connections: how many, for how long, and which requests reach the router.
//!
//! The REST router ([`crate::http`]) sees only requests that passed these checks; everything
//! refused here gets the protocol's JSON error body (`{"error": ...}`) and the connection is
//! closed, since the rest of its byte stream can no longer be trusted:
//!
//! | check | answer |
//! |---|---|
//! | more than `max_connections` open | 503, at accept |
//! | request line + headers not complete within `header_read_timeout_ms` (also the longest a kept-alive connection may sit idle: hyper runs this timer while it waits for the next request) | connection closed |
//! | body not complete within `body_read_timeout_ms` of its first wait for data | 408 |
//! | `Content-Length` above `max_body_bytes` | 413 before the body is read |
//! | both `Content-Length` and `Transfer-Encoding` (request smuggling) | 400 |
//! | request target over [`MAX_URI_BYTES`] | 414 |
//! | more than [`MAX_HEADERS`] header fields, or over [`MAX_HEADER_BYTES`] of them | 431 |
//!
//! hyper's own parser limits sit above these, as a backstop.

use crate::gateway::Gateway;
use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Longest request target accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields accepted.
pub const MAX_HEADERS: usize = 100;
/// Largest total size of header names and values accepted.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// A JSON error response that also closes the connection.
pub fn refusal(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    h.insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    r
}

/// The framing and size checks of the table above (`None`: the request may go on).
pub fn check_head(uri_len: usize, headers: &HeaderMap, max_body: usize) -> Option<Response<Body>> {
    if uri_len > MAX_URI_BYTES {
        return Some(refusal(
            StatusCode::URI_TOO_LONG,
            &format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        ));
    }
    let size: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if headers.len() > MAX_HEADERS || size > MAX_HEADER_BYTES {
        return Some(refusal(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!(
                "at most {MAX_HEADERS} header fields and {MAX_HEADER_BYTES} bytes of headers are accepted"
            ),
        ));
    }
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 0 && headers.contains_key(header::TRANSFER_ENCODING) {
        return Some(refusal(
            StatusCode::BAD_REQUEST,
            "a request may not carry both Content-Length and Transfer-Encoding",
        ));
    }
    if lengths > 0 {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        match declared {
            None => return Some(refusal(StatusCode::BAD_REQUEST, "Content-Length must be a byte count")),
            Some(n) if n > max_body as u64 => {
                return Some(refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("Content-Length {n} exceeds the server's max_body_bytes limit ({max_body})"),
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// A request body that fails once its read deadline has passed. The timer starts the first
/// time the body is not already there (a small body that arrived with its headers never
/// arms one: no timer entry per request on the hot path).
pub struct TimedBody {
    inner: hyper::body::Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        let t = self.timeout;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        if deadline.as_mut().poll(cx).is_ready() {
            let t = self.timeout;
            return Poll::Ready(Some(Err(format!("{BODY_TIMEOUT} ({t:?})").into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error text a [`TimedBody`] ends with; the REST layer turns it into 408.
pub const BODY_TIMEOUT: &str = "the request body did not arrive within body_read_timeout_ms";

/// Serves `router` on `listener` (over TLS when `tls` is given) under the limits of
/// `gw.limits` until `stop` turns true;
/// then closes idle connections, lets open requests finish, and returns when every
/// connection has ended.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    gw: Arc<Gateway>,
    tls: Option<crate::tls::ServerTls>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let limits = gw.limits.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let header_timeout = Duration::from_millis(limits.header_read_timeout_ms.max(1));
    let body_timeout = Duration::from_millis(limits.body_read_timeout_ms.max(1));
    let max_body = limits.max_body_bytes;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            gw.metrics.connections_refused.inc();
            tasks.spawn(refuse_busy(tcp, limits.max_connections));
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let gw = gw.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let _permit = permit;
            gw.metrics.connections_open.inc();
            let limits = ConnLimits { header_timeout, body_timeout, max_body };
            match tls {
                None => serve_conn(tcp, peer, router, limits, stop).await,
                // The handshake counts against the header timeout.
                Some(tls) => match tokio::time::timeout(header_timeout, tls.acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_conn(stream, peer, router, limits, stop).await,
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
            gw.metrics.connections_open.dec();
        });
    }
    // Closed now, not when the open connections are done: a client dialing during the drain
    // is refused at once instead of waiting in the accept backlog.
    drop(listener);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[derive(Clone, Copy)]
struct ConnLimits {
    header_timeout: Duration,
    body_timeout: Duration,
    max_body: usize,
}

/// One HTTP/1.1 connection over `io` (TCP, or TLS over TCP) until it ends or `stop`.
async fn serve_conn<IO>(
    io: IO,
    peer: std::net::SocketAddr,
    router: axum::Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ConnLimits { header_timeout, body_timeout, max_body } = limits;
    {
        {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let router = router.clone();
                // Boxed: `poll_without_shutdown` (for the lingering close) needs an `Unpin`
                // connection, hence an `Unpin` service future.
                Box::pin(async move {
                    let (parts, body) = req.into_parts();
                    let uri_len = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
                    if let Some(r) = check_head(uri_len, &parts.headers, max_body) {
                        return Ok::<_, std::convert::Infallible>(r);
                    }
                    let body = TimedBody { inner: body, deadline: None, timeout: body_timeout };
                    let req = Request::from_parts(parts, Body::new(body));
                    use tower::ServiceExt;
                    Ok(router.oneshot(req).await.unwrap_or_else(|e| match e {}))
                })
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_headers(MAX_HEADERS * 4)
                .keep_alive(true);
            let mut conn = builder.serve_connection(TokioIo::new(io), svc);
            let r = tokio::select! {
                r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => r,
                _ = stopped(&mut stop) => {
                    Pin::new(&mut conn).graceful_shutdown();
                    std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await
                }
            };
            log_conn_end(r, peer);
            linger(conn.into_parts().io.into_inner(), max_body).await;
        }
    }
}

/// Resolves once `stop` is true (holding no borrow of the channel afterwards).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn log_conn_end(r: Result<(), hyper::Error>, peer: std::net::SocketAddr) {
    if let Err(e) = r
        && !e.is_incomplete_message()
    {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// Closes a connection so that its client reads the last response: the write side is shut
/// first, then whatever the client still sends (the rest of a refused body) is read and
/// dropped for at most [`LINGER`], as web servers' lingering close does. Closing with unread
/// bytes would make the kernel reset the connection, and the client would see a broken pipe
/// instead of the 413 it was sent.
async fn linger<IO>(mut tcp: IO, max_body: usize)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = max_body.saturating_mul(2).max(1 << 20);
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Longest a closing connection is drained.
pub const LINGER: Duration = Duration::from_secs(2);

/// Answers 503 on a connection over the limit, without reading its request.
async fn refuse_busy(tcp: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({
        "error": format!("the server has {max} connections open (limits.max_connections); retry later")
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tcp = tcp;
    if tokio::time::timeout(Duration::from_secs(1), tcp.write_all(resp.as_bytes())).await.is_ok() {
        // The request is still unread: drain it so that the client reads the 503.
        linger(tcp, 64 * 1024).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn framing_and_sizes_are_checked_before_the_body() {
        let ok = headers(&[("content-length", "10")]);
        assert!(check_head(10, &ok, 100).is_none());
        let status = |r: Option<Response<Body>>| r.map(|r| r.status().as_u16());
        assert_eq!(status(check_head(10, &headers(&[("content-length", "1000000000000")]), 100)), Some(413));
        assert_eq!(
            status(check_head(
                10,
                &headers(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
                100
            )),
            Some(400)
        );
        assert_eq!(status(check_head(10, &headers(&[("content-length", "-1")]), 100)), Some(400));
        assert_eq!(status(check_head(MAX_URI_BYTES + 1, &ok, 100)), Some(414));
        let many: Vec<(String, String)> =
            (0..=MAX_HEADERS).map(|i| (format!("x-h{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(status(check_head(10, &headers(&many), 100)), Some(431));
    }
}
