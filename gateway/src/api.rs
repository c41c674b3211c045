//! The HTTP admin API (axum), on its own port: sending, broadcasting, kicking, presence and stats
//! behind a bearer token; `/healthz`, `/readyz`, `/metrics` and the OpenAPI document without one.
//! Every error is JSON: `{"error": "...", "message": "..."}`. `docs/openapi.json` describes it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use imgate_shared::protocol::Body;
use imgate_shared::{ErrorCode, KickReason, MessageId, SendStatus};
use serde::{Deserialize, Serialize};

use crate::base::{valid_id, valid_user_id, ID_RULE};
use crate::cluster::{ClusterError, NodeInfo, PresenceEntry};
use crate::metrics::ADMIN_REQUESTS;
use crate::node::Node;
use crate::store::{StoreError, StoredMessage, MAX_PAGE};
use futures_util::future::join_all;

/// The OpenAPI document of this API, served at [`OPENAPI`].
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

pub const HEALTHZ: &str = "/healthz";
pub const READYZ: &str = "/readyz";
pub const METRICS: &str = "/metrics";
pub const OPENAPI: &str = "/api/v1/openapi.json";
pub const MESSAGES: &str = "/api/v1/messages";
pub const BROADCAST: &str = "/api/v1/broadcast";
pub const USER: &str = "/api/v1/users/{id}";
pub const USER_CONNECTIONS: &str = "/api/v1/users/{id}/connections";
pub const USER_PRESENCE: &str = "/api/v1/users/{id}/presence";
pub const STATS: &str = "/api/v1/stats";
pub const USER_MESSAGES: &str = "/api/v1/users/{id}/messages";
pub const MESSAGE: &str = "/api/v1/messages/{id}";
pub const NODES: &str = "/api/v1/nodes";
pub const ALLOC: &str = "/api/v1/alloc";

/// Every route as (method, path); the OpenAPI document must describe exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", HEALTHZ),
    ("get", READYZ),
    ("get", METRICS),
    ("get", OPENAPI),
    ("post", MESSAGES),
    ("post", BROADCAST),
    ("put", USER),
    ("delete", USER_CONNECTIONS),
    ("get", USER_PRESENCE),
    ("get", STATS),
    ("get", USER_MESSAGES),
    ("get", MESSAGE),
    ("get", NODES),
    ("get", ALLOC),
];

/// Most recipients of one `POST /api/v1/messages`.
pub const MAX_RECIPIENTS: usize = 1000;

pub fn router(node: Arc<Node>) -> Router {
    let protected = Router::new()
        .route(MESSAGES, post(send_message))
        .route(BROADCAST, post(broadcast))
        .route(USER, put(register_user))
        .route(USER_CONNECTIONS, delete(kick_user))
        .route(USER_PRESENCE, get(presence))
        .route(STATS, get(stats))
        .route(USER_MESSAGES, get(history))
        .route(MESSAGE, get(message))
        .route(NODES, get(nodes))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_token));
    Router::new()
        .route(HEALTHZ, get(healthz))
        .route(READYZ, get(readyz))
        .route(METRICS, get(render_metrics))
        .route(OPENAPI, get(openapi))
        .route(ALLOC, get(alloc))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(count_requests))
        .with_state(node)
}

/// What the admin port serves while the node starts: alive, not ready, nothing else yet.
pub fn starting_router() -> Router {
    async fn starting() -> Response {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not_ready", "reason": "starting" })),
        )
            .into_response()
    }
    async fn unavailable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "unavailable",
            message: "the node is starting".into(),
        }
    }
    Router::new()
        .route(HEALTHZ, get(healthz))
        .route(READYZ, get(starting))
        .fallback(unavailable)
}

/// An API error, rendered as `{"error": kind, "message": ...}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "bad_request",
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.kind,
            message: &self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // The admin port cut the body off at its deadline (see `admin_port`).
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&r);
        while let Some(e) = cause {
            if e.is::<crate::admin_port::BodyTimeout>() {
                return ApiError {
                    status: StatusCode::REQUEST_TIMEOUT,
                    kind: "body_timeout",
                    message: e.to_string(),
                };
            }
            cause = e.source();
        }
        ApiError {
            status: r.status(),
            kind: "bad_request",
            message: r.body_text(),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

/// `Json` whose rejections are JSON errors.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
struct ApiJson<T>(T);

/// `Query` whose rejections are JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
struct ApiQuery<T>(T);

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found",
        message: "no such route".into(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "method_not_allowed",
        message: "method not allowed on this route".into(),
    }
}

/// Counts every request by matched route and status.
async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    metrics::counter!(ADMIN_REQUESTS, "route" => route, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

/// Compares in time independent of where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token)
            if constant_time_eq(token.as_bytes(), node.settings.admin_token().as_bytes()) =>
        {
            next.run(req).await
        }
        _ => {
            let mut response = ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "unauthorized",
                message: "missing or wrong bearer token".into(),
            }
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if let Some(reason) = node.not_ready_reason() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not_ready", "reason": reason })),
        )
            .into_response()
    } else {
        Json(serde_json::json!({ "status": "ready" })).into_response()
    }
}

async fn render_metrics(State(node): State<Arc<Node>>) -> Response {
    node.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.prometheus.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// One user id or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Recipients {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    to: Recipients,
    #[serde(default)]
    channel: Option<String>,
    /// Send on behalf of this user; a system message when absent.
    #[serde(default)]
    from: Option<String>,
    /// The caller's id for the message: sending it again to the same recipient stores nothing
    /// new and answers with the first id.
    #[serde(default)]
    client_msg_id: Option<String>,
    body: Body,
    /// A repetition of a request whose answer never came: recipients that already have a stored
    /// message with this `client_msg_id` are answered from the store and not pushed again.
    #[serde(default)]
    retry: bool,
}

#[derive(Serialize)]
struct RecipientResult {
    user_id: String,
    /// The message's id for this recipient; absent when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<MessageId>,
    status: SendStatus,
    connections: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<ErrorCode>,
}

#[derive(Serialize)]
struct SendResponse {
    results: Vec<RecipientResult>,
}

/// Checks the sender, channel type and body size of an admin message.
fn check_message(
    node: &Node,
    from: Option<&str>,
    channel: Option<&str>,
    body: Option<&Body>,
) -> Result<(), ApiError> {
    let max = node.settings.client.max_frame_len;
    if body.is_some_and(|b| b.get().len() > max) {
        return Err(ApiError::bad_request(format!(
            "body is longer than the maximum frame length of {max} bytes"
        )));
    }
    if from.is_some_and(|f| !valid_user_id(f)) {
        return Err(ApiError::bad_request(format!("from must be {ID_RULE}")));
    }
    if let Some(c) = channel {
        if !node.router.is_channel(c) {
            return Err(ApiError::bad_request(format!(
                "unknown channel type {c:?}; accepted: {}",
                node.settings.channels.types.join(", ")
            )));
        }
    }
    Ok(())
}

async fn send_message(
    State(node): State<Arc<Node>>,
    ApiJson(req): ApiJson<SendRequest>,
) -> Result<Json<SendResponse>, ApiError> {
    let to = match req.to {
        Recipients::One(u) => vec![u],
        Recipients::Many(list) => list,
    };
    if to.is_empty() || to.len() > MAX_RECIPIENTS {
        return Err(ApiError::bad_request(format!(
            "to must name 1 to {MAX_RECIPIENTS} users"
        )));
    }
    if let Some(bad) = to.iter().find(|u| !valid_user_id(u)) {
        return Err(ApiError::bad_request(format!(
            "user id {bad:?} must be {ID_RULE}"
        )));
    }
    check_message(
        &node,
        req.from.as_deref(),
        req.channel.as_deref(),
        Some(&req.body),
    )?;
    if let Some(c) = &req.client_msg_id {
        if !valid_id(c) {
            return Err(ApiError::bad_request(format!(
                "client_msg_id must be {ID_RULE}"
            )));
        }
    }
    if req.retry && req.client_msg_id.is_none() {
        return Err(ApiError::bad_request(
            "retry needs the client_msg_id of the request it repeats",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let to: Vec<String> = to.into_iter().filter(|u| seen.insert(u.clone())).collect();
    // Each message runs to completion in the node's tasks even if the HTTP client goes away.
    let from: Option<Arc<str>> = req.from.map(Into::into);
    let deliveries: Vec<_> = to
        .into_iter()
        .map(|user| {
            let mut msg = node.router.accept(
                from.clone(),
                user,
                req.channel.clone(),
                req.body.clone(),
                req.client_msg_id.clone(),
            );
            msg.retry = req.retry;
            let node = node.clone();
            async move {
                let user_id = msg.to.clone();
                (user_id, node.router.submit(msg).await)
            }
        })
        .collect();
    let task = node.tasks.spawn(join_all(deliveries));
    let deliveries = task.await.map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "internal",
        message: format!("sending failed: {e}"),
    })?;
    let results = deliveries
        .into_iter()
        .map(|(user_id, d)| RecipientResult {
            user_id,
            id: d.id,
            status: d.status,
            connections: d.connections,
            reason: d.reason,
        })
        .collect();
    Ok(Json(SendResponse { results }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    from: Option<String>,
    body: Body,
}

#[derive(Serialize)]
struct BroadcastResponse {
    id: MessageId,
    connections: usize,
}

async fn broadcast(
    State(node): State<Arc<Node>>,
    ApiJson(req): ApiJson<BroadcastRequest>,
) -> Result<Json<BroadcastResponse>, ApiError> {
    check_message(
        &node,
        req.from.as_deref(),
        req.channel.as_deref(),
        Some(&req.body),
    )?;
    let (id, connections) = node
        .router
        .broadcast(req.from.as_deref(), req.channel.as_deref(), &req.body)
        .await;
    Ok(Json(BroadcastResponse { id, connections }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelQuery {
    #[serde(default)]
    channel: Option<String>,
}

#[derive(Serialize)]
struct KickResponse {
    user_id: String,
    kicked: usize,
}

async fn kick_user(
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
    ApiQuery(q): ApiQuery<ChannelQuery>,
) -> Result<Json<KickResponse>, ApiError> {
    check_user(&user)?;
    check_message(&node, None, q.channel.as_deref(), None)?;
    let kicked = node
        .router
        .kick(&user, q.channel.as_deref(), KickReason::Admin)
        .await;
    Ok(Json(KickResponse {
        user_id: user,
        kicked,
    }))
}

#[derive(Serialize)]
struct RegisterResponse {
    user_id: String,
    known: bool,
}

/// Makes `user` known to the cluster (for `delivery.recipients = "known"`): messages to them are
/// accepted from now on, before their first login. Idempotent.
async fn register_user(
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
) -> Result<Json<RegisterResponse>, ApiError> {
    check_user(&user)?;
    node.router
        .recipients()
        .register(&user)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "unavailable",
            message: format!("the database did not record the user: {e}"),
        })?;
    Ok(Json(RegisterResponse {
        user_id: user,
        known: true,
    }))
}

fn check_user(user: &str) -> Result<(), ApiError> {
    if valid_user_id(user) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("user id must be {ID_RULE}")))
    }
}

#[derive(Serialize)]
struct PresenceResponse {
    user_id: String,
    online: bool,
    connections: Vec<PresenceEntry>,
}

/// 503 for a cluster operation that Redis could not answer.
fn cluster_unavailable(e: ClusterError) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "unavailable",
        message: e.to_string(),
    }
}

fn store_failed(e: StoreError) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "unavailable",
        message: e.to_string(),
    }
}

async fn presence(
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
) -> Result<Json<PresenceResponse>, ApiError> {
    check_user(&user)?;
    let mut connections = node
        .cluster()
        .presence(&user)
        .await
        .map_err(cluster_unavailable)?;
    connections.sort_by(|a, b| (&a.node_id, a.conn_id).cmp(&(&b.node_id, b.conn_id)));
    Ok(Json(PresenceResponse {
        user_id: user,
        online: !connections.is_empty(),
        connections,
    }))
}

#[derive(Serialize)]
struct NodesResponse {
    nodes: Vec<NodeInfo>,
}

/// Live nodes, least loaded first.
async fn live_nodes(node: &Node) -> Result<Vec<NodeInfo>, ApiError> {
    let mut nodes = node.cluster().nodes().await.map_err(cluster_unavailable)?;
    nodes.sort_by(|a, b| (a.connections, &a.id).cmp(&(b.connections, &b.id)));
    Ok(nodes)
}

async fn nodes(State(node): State<Arc<Node>>) -> Result<Json<NodesResponse>, ApiError> {
    Ok(Json(NodesResponse {
        nodes: live_nodes(&node).await?,
    }))
}

#[derive(Serialize)]
struct HeartbeatHint {
    min_ms: u64,
    max_ms: u64,
    default_ms: u64,
}

#[derive(Serialize)]
struct ReconnectHint {
    initial_ms: u64,
    max_ms: u64,
    jitter: f64,
}

#[derive(Serialize)]
struct AllocResponse {
    nodes: Vec<NodeInfo>,
    heartbeat: HeartbeatHint,
    reconnect: ReconnectHint,
}

/// Public: where clients should connect, least loaded first, with heartbeat and backoff hints.
async fn alloc(State(node): State<Arc<Node>>) -> Result<Json<AllocResponse>, ApiError> {
    let hb = &node.settings.heartbeat;
    Ok(Json(AllocResponse {
        nodes: live_nodes(&node).await?,
        heartbeat: HeartbeatHint {
            min_ms: hb.min_ms,
            max_ms: hb.max_ms,
            default_ms: hb.default_ms,
        },
        reconnect: ReconnectHint {
            initial_ms: 200,
            max_ms: 30_000,
            jitter: 0.5,
        },
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    #[serde(default)]
    peer: Option<String>,
    #[serde(default)]
    before: Option<MessageId>,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Serialize)]
struct HistoryResponse {
    user_id: String,
    messages: Vec<StoredMessage>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<MessageId>,
}

/// Default and largest page of the history API.
pub const DEFAULT_PAGE: u32 = 50;

async fn history(
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryResponse>, ApiError> {
    check_user(&user)?;
    if let Some(peer) = &q.peer {
        check_user(peer)?;
    }
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let messages = node
        .store()
        .history(&user, q.peer.as_deref(), q.before, limit)
        .await
        .map_err(store_failed)?;
    let next_before = (messages.len() == limit as usize)
        .then(|| messages.last().map(|m| m.id))
        .flatten();
    Ok(Json(HistoryResponse {
        user_id: user,
        messages,
        next_before,
    }))
}

async fn message(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<StoredMessage>, ApiError> {
    let id: MessageId = id
        .parse()
        .map_err(|_| ApiError::bad_request("a message id is a decimal number"))?;
    match node.store().message(id).await.map_err(store_failed)? {
        Some(m) => Ok(Json(m)),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: format!("no message {id}"),
        }),
    }
}

#[derive(Serialize)]
struct StatsResponse {
    node_id: String,
    started_at_ms: u64,
    uptime_secs: u64,
    ready: bool,
    connections: usize,
    users: usize,
    open_sockets: usize,
    max_connections: usize,
    /// Client sockets that have not logged in yet.
    pending_logins: usize,
    connections_by_transport: BTreeMap<&'static str, usize>,
    connections_by_channel: BTreeMap<String, usize>,
    /// Whether the node is part of a Redis cluster, and whether its bus is connected.
    clustered: bool,
    bus_up: bool,
    /// Messages waiting for the database writer.
    store_queue_depth: usize,
    /// Resident memory of the node's process (Linux; absent elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_rss_bytes: Option<u64>,
}

/// Resident set size of this process, from `/proc/self/statm` (Linux only).
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The page size is 4 KiB on every Linux platform this runs on.
    Some(pages * 4096)
}

async fn stats(State(node): State<Arc<Node>>) -> Json<StatsResponse> {
    let mut by_transport = BTreeMap::new();
    let mut by_channel = BTreeMap::new();
    node.registry().for_each(None, |c| {
        *by_transport.entry(c.transport.as_str()).or_insert(0) += 1;
        *by_channel.entry(c.channel.to_string()).or_insert(0) += 1;
    });
    Json(StatsResponse {
        node_id: node.node_id().to_owned(),
        started_at_ms: node.started_at_ms,
        uptime_secs: node.started_at.elapsed().as_secs(),
        ready: node.is_ready(),
        connections: node.registry().connection_count(),
        users: node.registry().user_count(),
        open_sockets: node.open_sockets(),
        max_connections: node.max_connections(),
        pending_logins: node.pending_logins(),
        connections_by_transport: by_transport,
        connections_by_channel: by_channel,
        clustered: node.cluster().is_clustered(),
        bus_up: node.cluster().bus_up(),
        store_queue_depth: node.store().queue_depth(),
        memory_rss_bytes: resident_memory_bytes(),
    })
}
