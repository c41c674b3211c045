//! The admin port's HTTP server: an accept loop that serves each connection with hyper (HTTP/1.1)
//! under limits, so that idle or slow clients cannot hold the node's descriptors.
//!
//! - At most `admin.max_connections` connections; one more is answered `503` at once (written
//!   without reading its request) and closed.
//! - A connection with no request in progress is closed after `admin.idle_timeout_ms` (a new
//!   connection too, until its first byte).
//! - A request's head must arrive within `admin.header_timeout_ms` of its first byte.
//! - A request's whole body must arrive within `admin.body_timeout_ms` of its head; otherwise the
//!   answer is `408` `body_timeout` and the connection is closed.
//!
//! Graceful shutdown stops accepting, lets requests in progress finish (still under the
//! timeouts) and closes idle connections.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::AdminSettings;
use crate::metrics;

/// What a refused connection is told before it is closed.
const FULL_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 77\r\n\r\n{\"error\":\"too_many_connections\",\"message\":\"admin connection limit reached\"}\n";

/// The limits of one admin server, from [`AdminSettings`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

impl Limits {
    pub fn new(s: &AdminSettings) -> Self {
        Limits {
            max_connections: s.max_connections,
            idle_timeout: Duration::from_millis(s.idle_timeout_ms),
            header_timeout: Duration::from_millis(s.header_timeout_ms),
            body_timeout: Duration::from_millis(s.body_timeout_ms),
        }
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the open connections
/// to finish (requests in progress complete; idle connections close at once).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let open = Arc::new(AtomicUsize::new(0));
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                warn!(error = %e, "admin accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let Some(slot) = Slot::claim(&open, limits.max_connections) else {
            ::metrics::counter!(metrics::ADMIN_CONNECTIONS_REJECTED).increment(1);
            refuse(stream);
            continue;
        };
        tasks.spawn(serve_connection(
            stream,
            app.clone(),
            limits,
            stop.clone(),
            slot,
        ));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// Answers 503 and closes, without a task: what the client already sent is read (so that the
/// close is a FIN, not a reset that could discard the answer), the answer fits the empty send
/// buffer, and nothing waits.
fn refuse(stream: TcpStream) {
    let mut sink = [0u8; 1024];
    for _ in 0..8 {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = stream.try_write(FULL_RESPONSE);
}

/// One of the admin server's connection slots, with the open-connections gauge.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn claim(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        ::metrics::gauge!(metrics::ADMIN_CONNECTIONS).increment(1.0);
        Some(Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        ::metrics::gauge!(metrics::ADMIN_CONNECTIONS).decrement(1.0);
    }
}

/// Where a connection is: waiting for a request, reading a request's head, or in a request.
const IDLE: u8 = 0;
const HEAD: u8 = 1;
const REQUEST: u8 = 2;

/// A connection's phase, shared by its socket (first byte of a head), its service (request in
/// and out) and its watchdog (which applies the phase's timeout).
struct Activity {
    phase: AtomicU8,
    changed: Notify,
}

impl Activity {
    fn set(&self, phase: u8) {
        if self.phase.swap(phase, Ordering::AcqRel) != phase {
            // A stored permit: the watchdog sees the change even if it is not waiting yet.
            self.changed.notify_one();
        }
    }

    fn read_bytes(&self) {
        if self
            .phase
            .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.changed.notify_one();
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
    _slot: Slot,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity {
        phase: AtomicU8::new(IDLE),
        changed: Notify::new(),
    });
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        let app = TowerToHyperService::new(app);
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let activity = activity.clone();
            let app = app.clone();
            async move {
                activity.set(REQUEST);
                let timed_out = Arc::new(AtomicBool::new(false));
                let req =
                    req.map(|body| DeadlineBody::new(body, limits.body_timeout, timed_out.clone()));
                let response = hyper::service::Service::call(&app, req)
                    .await
                    .unwrap_or_else(|e: Infallible| match e {});
                let response = if timed_out.load(Ordering::Acquire) {
                    ::metrics::counter!(metrics::ADMIN_TIMEOUTS, "phase" => "body").increment(1);
                    body_timed_out(response)
                } else {
                    response
                };
                activity.set(IDLE);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The head's timeout is the watchdog's: hyper's own would start while the connection idles.
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let phase = activity.phase.load(Ordering::Acquire);
        let (timeout, name) = match phase {
            IDLE => (Some(limits.idle_timeout), "idle"),
            HEAD => (Some(limits.header_timeout), "header"),
            _ => (None, "request"),
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "admin connection failed");
                }
                return;
            }
            // The phase changed: its clock starts now.
            _ = activity.changed.notified() => {}
            _ = sleep_until(deadline) => {
                ::metrics::counter!(metrics::ADMIN_TIMEOUTS, "phase" => name).increment(1);
                debug!(phase = name, "admin connection timed out");
                return;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The answer to a request whose body timed out: the router's own 408 (from the API's JSON
/// extractor), or one made here when a handler answered otherwise; either way the connection is
/// closed, since the rest of the body would be taken for the next request.
fn body_timed_out(response: Response) -> Response {
    let mut response = if response.status() == StatusCode::REQUEST_TIMEOUT {
        response
    } else {
        (
            StatusCode::REQUEST_TIMEOUT,
            axum::Json(serde_json::json!({
                "error": "body_timeout",
                "message": BodyTimeout.to_string(),
            })),
        )
            .into_response()
    };
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The socket, telling the connection's [`Activity`] when the first byte of a request arrives.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_bytes();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The body did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the body timeout")]
pub struct BodyTimeout;

/// A request body that must be complete by a deadline, set when the request's head arrived.
struct DeadlineBody {
    inner: Incoming,
    /// `None` once the body is complete, or when it was empty.
    deadline: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration, timed_out: Arc<AtomicBool>) -> Self {
        let deadline = (!inner.is_end_stream()).then(|| Box::pin(tokio::time::sleep(timeout)));
        DeadlineBody {
            inner,
            deadline,
            timed_out,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                this.deadline = None;
                this.timed_out.store(true, Ordering::Release);
                Poll::Ready(Some(Err(BodyTimeout.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
