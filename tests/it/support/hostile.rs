//! A gateway that misbehaves on purpose: a proxy on 127.0.0.1:0 in front of the real sandbox,
//! which forwards every request and lets a test answer instead of it, delay it, or edit its
//! JSON answer. Each test states one way a server can be wrong, in a few lines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: Method,
    /// The path under `/api/partner-gateway/v1`, e.g. `/contacts` or `/contacts/list`.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Value,
    /// 0 for the first request the proxy received, then 1, 2, …
    pub seq: u64,
}

impl Req {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// `GET /contacts` reading a list's members.
    pub fn is_member_read(&self) -> bool {
        self.method == Method::GET && self.path == "/contacts" && self.param("listIds").is_some()
    }

    /// `GET /contacts` reading contacts (not members).
    pub fn is_contact_scan(&self) -> bool {
        self.method == Method::GET && self.path == "/contacts" && self.param("listIds").is_none()
    }

    pub fn offset(&self) -> u64 {
        self.param("offset").and_then(|o| o.parse().ok()).unwrap_or(0)
    }
}

type Answer = dyn Fn(&Req) -> Option<Response> + Send + Sync;
type Edit = dyn Fn(&Req, &mut Value) + Send + Sync;
type Delay = dyn Fn(&Req) -> Duration + Send + Sync;
type Rewrite = dyn Fn(&mut Vec<(String, String)>) + Send + Sync;

/// What the proxy does differently from the sandbox.
#[derive(Clone, Default)]
pub struct Behaviour {
    answer: Option<Arc<Answer>>,
    edit: Option<Arc<Edit>>,
    delay: Option<Arc<Delay>>,
    rewrite: Option<Arc<Rewrite>>,
}

impl Behaviour {
    /// Answers in the sandbox's place when `f` returns a response.
    pub fn answer(mut self, f: impl Fn(&Req) -> Option<Response> + Send + Sync + 'static) -> Self {
        self.answer = Some(Arc::new(f));
        self
    }

    /// Edits the sandbox's JSON answer.
    pub fn edit(mut self, f: impl Fn(&Req, &mut Value) + Send + Sync + 'static) -> Self {
        self.edit = Some(Arc::new(f));
        self
    }

    /// Rewrites the query the sandbox receives (the edit and answer hooks still see the
    /// request as sent): a server that ignores a parameter, or serves smaller pages than asked.
    pub fn rewrite(mut self, f: impl Fn(&mut Vec<(String, String)>) + Send + Sync + 'static) -> Self {
        self.rewrite = Some(Arc::new(f));
        self
    }

    /// Holds the request this long before forwarding it.
    pub fn delay(mut self, f: impl Fn(&Req) -> Duration + Send + Sync + 'static) -> Self {
        self.delay = Some(Arc::new(f));
        self
    }
}

struct Shared {
    upstream: String,
    behaviour: Behaviour,
    client: reqwest::Client,
    seq: AtomicU64,
}

/// A running misbehaving gateway.
pub struct Hostile {
    pub base_url: String,
    cancel: CancellationToken,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Hostile {
    /// Serves `behaviour` in front of the sandbox at `upstream` (its base URL, `…/api`).
    pub async fn start(upstream: &str, behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            // The origin: the request's own path already starts with `/api`.
            upstream: upstream.trim_end_matches('/').trim_end_matches("/api").to_owned(),
            behaviour,
            client: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client"),
            seq: AtomicU64::new(0),
        });
        let app = axum::Router::new().fallback(proxy).with_state(shared);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        });
        Self { base_url: format!("http://{addr}/api"), cancel }
    }
}

const PREFIX: &str = "/api/partner-gateway/v1";

async fn proxy(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    let path = parts.uri.path().strip_prefix(PREFIX).unwrap_or(parts.uri.path()).to_owned();
    let query =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri).map(|q| q.0).unwrap_or_default();
    let req = Req {
        method: parts.method.clone(),
        path,
        query,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        seq: shared.seq.fetch_add(1, Ordering::SeqCst),
    };
    if let Some(delay) = &shared.behaviour.delay {
        tokio::time::sleep(delay(&req)).await;
    }
    if let Some(answer) = &shared.behaviour.answer
        && let Some(response) = answer(&req)
    {
        return response;
    }
    let url = match &shared.behaviour.rewrite {
        None => format!("{}{}", shared.upstream, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")),
        Some(rewrite) => {
            let mut query = req.query.clone();
            rewrite(&mut query);
            let mut url = reqwest::Url::parse(&format!("{}{}", shared.upstream, parts.uri.path())).expect("url");
            url.query_pairs_mut().clear().extend_pairs(&query);
            if query.is_empty() {
                url.set_query(None);
            }
            url.to_string()
        }
    };
    let mut forward = shared.client.request(parts.method.clone(), &url).body(body);
    for (name, value) in headers_to_forward(&parts.headers) {
        forward = forward.header(name, value);
    }
    let upstream = match forward.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = upstream.status().as_u16();
    let bytes = upstream.bytes().await.unwrap_or_default();
    let Some(edit) = &shared.behaviour.edit else {
        return json_response(status, bytes);
    };
    let mut value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    edit(&req, &mut value);
    json_response(status, Bytes::from(serde_json::to_vec(&value).unwrap_or_default()))
}

fn headers_to_forward(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| matches!(name.as_str(), "x-api-key" | "authorization" | "content-type"))
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect()
}

fn json_response(status: u16, body: Bytes) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, [("content-type", "application/json")], body).into_response()
}

/// A JSON answer with this status.
pub fn json(status: u16, body: Value) -> Response {
    json_response(status, Bytes::from(serde_json::to_vec(&body).unwrap_or_default()))
}

/// An answer whose body never ends (chunked, 64 KiB at a time).
pub fn endless_body() -> Response {
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let stream = futures_util::stream::repeat_with(move || Ok::<_, std::convert::Infallible>(chunk.clone()));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// Records the headers of every request it receives (the "other host" of a redirect test).
pub struct Recorder {
    pub base_url: String,
    pub seen: Arc<std::sync::Mutex<Vec<HeaderMap>>>,
    cancel: CancellationToken,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Recorder {
    /// Listens on `ip` (another loopback address is another origin).
    pub async fn start(ip: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<std::sync::Mutex<Vec<HeaderMap>>> = Arc::default();
        let sink = seen.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap| {
            let sink = sink.clone();
            async move {
                sink.lock().expect("lock").push(headers);
                json(200, serde_json::json!({"contacts": [], "total": 0}))
            }
        });
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        });
        Self { base_url: format!("http://{addr}"), seen, cancel }
    }
}
