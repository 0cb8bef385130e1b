//! The HTTP server: one page (plain HTML, CSS and JavaScript compiled into the binary) and a
//! small JSON API behind it.
//!
//! ```text
//! GET  /                 the labelling page         GET /status      the team's status page
//! GET  /api/next         the prompt to rank next and progress
//! POST /api/answer       {"id", "order": [[best...], ...], "flags", "comment", "seconds"}
//! POST /api/skip         {"id"}
//! GET  /api/stats        the team's figures (leads only)
//! ```
//!
//! Safe by default: it binds 127.0.0.1; any other address needs `--labellers`, and then
//! every API request carries a labeller's token (`Authorization: Bearer TOKEN`; the page
//! reads it from the link's `#token=` fragment, which browsers never send to a server). A
//! token sees only its own labeller's prompts and progress. Request bodies are limited to
//! [`MAX_BODY`] bytes. Prompts and responses are model or user text: the page writes them
//! with `textContent` only, and a Content-Security-Policy that forbids inline scripts backs
//! that up.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::book::{Answer, Book, Refusal};
use crate::team::{find_by_token, read_team, Labeller};
use crate::{err, Result};

/// The largest request body accepted, in bytes (an answer with a long comment is a few KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// The labeller's name when no `--labellers` file is given (one person, on this machine).
pub const LOCAL: &str = "local";

/// `candor label serve`'s options.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Candidates JSONL (`candor sample` output): {"prompt", "responses": [...]}.
    pub input: PathBuf,
    /// Rankings JSONL, appended to (the format `candor rank` writes, plus `labeller`,
    /// `seconds`, `flags`, `comment`).
    pub out: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    pub bind: String,
    /// The labellers file (names and tokens); without it one person labels, without a token.
    pub labellers: Option<PathBuf>,
    /// How many different labellers rank each prompt.
    pub overlap: usize,
}

struct App {
    book: Mutex<Book>,
    team: Option<Vec<Labeller>>,
}

/// Who is asking.
struct Who {
    name: String,
    lead: bool,
}

/// A running server; dropping it (or [`Server::stop`]) shuts it down.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Check the options, read the candidates and the rankings so far, bind, and serve in
    /// a background thread. With `ctrl_c`, Ctrl-C stops the server too.
    pub fn start(opts: &ServeOptions, ctrl_c: bool) -> Result<Server> {
        let addr: SocketAddr = opts.bind.parse().map_err(|_| {
            err(format!(
                "--bind {}: expected an address and port such as 127.0.0.1:8080",
                opts.bind
            ))
        })?;
        let team = opts.labellers.as_deref().map(read_team).transpose()?;
        if !addr.ip().is_loopback() && team.is_none() {
            return Err(err(format!(
                "--bind {}: listening beyond this machine needs --labellers FILE, so that every request carries a labeller's token",
                opts.bind
            )));
        }
        if team.is_none() && opts.overlap > 1 {
            return Err(err(format!(
                "--overlap {}: more than one labeller per prompt needs --labellers FILE",
                opts.overlap
            )));
        }
        let book = Book::open(&opts.input, &opts.out, opts.overlap)?;
        let listener = TcpListener::bind(addr)
            .map_err(|e| err(format!("--bind {}: cannot listen: {e}", opts.bind)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| err(format!("--bind {}: {e}", opts.bind)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("--bind {}: {e}", opts.bind)))?;
        let app = Arc::new(App {
            book: Mutex::new(book),
            team,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("candor-label".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_io()
                    .build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    // stop on `Server::stop` (or drop), or on Ctrl-C when asked
                    let notify = Arc::new(tokio::sync::Notify::new());
                    let on_stop = notify.clone();
                    tokio::spawn(async move {
                        let _ = stopped.await;
                        on_stop.notify_one();
                    });
                    if ctrl_c {
                        let on_ctrl_c = notify.clone();
                        tokio::spawn(async move {
                            if tokio::signal::ctrl_c().await.is_ok() {
                                on_ctrl_c.notify_one();
                            }
                        });
                    }
                    let shutdown = async move { notify.notified().await };
                    axum::serve(listener, router(app))
                        .with_graceful_shutdown(shutdown)
                        .await
                })
            })
            .map_err(|e| err(format!("cannot start the server thread: {e}")))?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's address.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Serve until the process is stopped (Ctrl-C, if started with `ctrl_c`).
    pub fn wait(mut self) -> Result<()> {
        let thread = self.thread.take().unwrap();
        let _keep = self.stop.take(); // holding the sender keeps the server up
        thread
            .join()
            .map_err(|_| err("the server thread panicked"))?
            .map_err(|e| err(format!("server: {e}")))
    }

    /// Stop accepting, finish the requests in flight, and close the output.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| err("the server thread panicked"))?
                .map_err(|e| err(format!("server: {e}"))),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html", include_str!("page/index.html")) }),
        )
        .route(
            "/status",
            get(|| async { page("text/html", include_str!("page/status.html")) }),
        )
        .route(
            "/label.css",
            get(|| async { page("text/css", include_str!("page/label.css")) }),
        )
        .route(
            "/label.js",
            get(|| async { page("text/javascript", include_str!("page/label.js")) }),
        )
        .route(
            "/status.js",
            get(|| async { page("text/javascript", include_str!("page/status.js")) }),
        )
        .route("/api/next", get(next))
        .route("/api/answer", post(answer))
        .route("/api/skip", post(skip))
        .route("/api/stats", get(stats))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(app)
}

fn page(kind: &str, body: &'static str) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&format!("{kind}; charset=utf-8")).unwrap(),
        )],
        body,
    )
        .into_response()
}

/// No inline script, no framing, no sniffing, nothing cached or sent as a referrer.
async fn secure_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in set {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn who(app: &App, headers: &HeaderMap) -> Result<Who, (StatusCode, String)> {
    let Some(team) = &app.team else {
        return Ok(Who {
            name: LOCAL.into(),
            lead: true,
        });
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    match find_by_token(team, token.trim()) {
        Some(l) => Ok(Who {
            name: l.name.clone(),
            lead: l.lead,
        }),
        None => Err((
            StatusCode::UNAUTHORIZED,
            "a labeller's token is needed: open the link you were given (it ends in #token=...)"
                .into(),
        )),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, (StatusCode, String)> {
    serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("bad request: {e}")))
}

fn lock(app: &App) -> std::sync::MutexGuard<'_, Book> {
    // a panic while holding the lock cannot leave a half-written answer behind (the book
    // records an answer only after it is on disk), so the data is still good to use
    app.book.lock().unwrap_or_else(|p| p.into_inner())
}

async fn next(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let who = match who(&app, &headers) {
        Ok(w) => w,
        Err((status, msg)) => return error(status, msg),
    };
    let mut book = lock(&app);
    let item = book.next(&who.name, Instant::now()).map(|id| {
        let c = book.item(id);
        json!({ "id": id, "prompt": c.prompt, "responses": c.responses })
    });
    Json(json!({
        "labeller": who.name,
        "lead": who.lead,
        "item": item,
        "progress": book.progress(&who.name),
    }))
    .into_response()
}

async fn answer(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let who = match who(&app, &headers) {
        Ok(w) => w,
        Err((status, msg)) => return error(status, msg),
    };
    let answer: Answer = match parse(&body) {
        Ok(a) => a,
        Err((status, msg)) => return error(status, msg),
    };
    // the write and its fsync block: off the async workers
    let result = tokio::task::spawn_blocking(move || {
        let mut book = lock(&app);
        book.submit(&who.name, &answer)
            .map(|()| book.progress(&who.name))
    })
    .await;
    match result {
        Ok(Ok(progress)) => Json(json!({ "saved": true, "progress": progress })).into_response(),
        Ok(Err(Refusal::Bad(m))) => error(StatusCode::BAD_REQUEST, m),
        Ok(Err(Refusal::AlreadyRanked)) => error(
            StatusCode::CONFLICT,
            "you have already ranked this prompt; your first answer is kept",
        ),
        Ok(Err(Refusal::Io(m))) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the answer could not be saved: {m}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipRequest {
    id: usize,
}

async fn skip(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let who = match who(&app, &headers) {
        Ok(w) => w,
        Err((status, msg)) => return error(status, msg),
    };
    let req: SkipRequest = match parse(&body) {
        Ok(a) => a,
        Err((status, msg)) => return error(status, msg),
    };
    let mut book = lock(&app);
    match book.skip(&who.name, req.id) {
        Ok(()) => {
            Json(json!({ "skipped": true, "progress": book.progress(&who.name) })).into_response()
        }
        Err(Refusal::Bad(m)) => error(StatusCode::BAD_REQUEST, m),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "skip failed"),
    }
}

async fn stats(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let who = match who(&app, &headers) {
        Ok(w) => w,
        Err((status, msg)) => return error(status, msg),
    };
    if !who.lead {
        return error(
            StatusCode::FORBIDDEN,
            "the team's status is for leads (`lead: true` in the labellers file)",
        );
    }
    let book = lock(&app);
    let progress = book.progress(&who.name);
    Json(json!({
        "input": book.input().display().to_string(),
        "out": book.out().display().to_string(),
        "progress": {
            "team_done": progress.team_done,
            "team_needed": progress.team_needed,
            "prompts": progress.prompts,
            "overlap": progress.overlap,
        },
        "stats": crate::stats::stats(book.lines()),
    }))
    .into_response()
}
