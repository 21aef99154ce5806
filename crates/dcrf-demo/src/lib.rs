//! The dcrf demo server as a library, so tests can run it in-process.
//!
//! Endpoints:
//! - `/ws/echo/`: `echo` (returns every field but `action` and `request_id`) and `whoami`
//!   (the user, or null);
//! - `/ws/todos/`: the `todo` model: list (paginated), retrieve, create, update, patch, delete,
//!   subscribe_instance / unsubscribe_instance, subscribe_list / unsubscribe_list (live lists),
//!   subscribe_to_all / unsubscribe_from_all, bulk_set_done; every push carries its stream
//!   `position` and every subscribe accepts `since` (see the delivery guarantees in `docs/`);
//! - `/ws`: the multiplexed socket (`{"stream": S, "payload": ...}`) with streams `things`,
//!   `things_with_id`, `todos`, `echo` and `api`;
//! - `/api/todos`, `/api/todos/{id}`, `/api/whoami`: plain HTTP, also served over the socket at
//!   `/ws/api/` (and the `api` stream);
//! - `/metrics`: Prometheus metrics (see `docs/observability.md`), unless
//!   [`DemoConfig::metrics`] is off;
//! - `/`: a live todo page built on the TypeScript client (`clients/typescript`), see [`page`].

use dcrf::auth::JwtAuth;
use dcrf::multiplex::Demultiplexer;
use dcrf::prelude::*;

pub mod api;
pub mod echo;
pub mod page;
pub mod things;
pub mod todos;
pub mod typescript;

/// The JWT secret the demo uses when none is given (`--jwt-secret`): fine for a demo, never
/// for production. The binary refuses to serve a non-loopback address with it.
pub const DEFAULT_JWT_SECRET: &str = "dcrf-demo-insecure-secret";

/// Is `secret` acceptable for a server listening on `addr`? The built-in
/// [`DEFAULT_JWT_SECRET`] is public: anyone could sign tokens with it, so it is only for
/// loopback addresses. `Err` is the message to print.
pub fn check_jwt_secret(secret: &str, addr: std::net::SocketAddr) -> Result<(), String> {
    if secret == DEFAULT_JWT_SECRET && !addr.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {addr} with the built-in JWT secret (anyone can sign tokens \
             with it); set --jwt-secret or DCRF_DEMO_JWT_SECRET, or bind a loopback address"
        ));
    }
    Ok(())
}

/// How the demo is set up.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Shared secret for HS256 JWTs (`Authorization: Bearer` or `?token=`).
    pub jwt_secret: String,
    /// Database URL: SQLite (`sqlite://file?mode=rwc`, `sqlite::memory:`) or PostgreSQL.
    pub database: String,
    /// Todos to insert at start.
    pub seed: u64,
    /// Channel layer: `memory` (one process) or `redis://host:port` (several).
    pub layer: String,
    /// The most connections served at once ([`Dcrf::max_connections`]).
    pub max_connections: usize,
    /// The most connections from one client IP ([`Dcrf::max_connections_per_ip`]).
    pub max_connections_per_ip: usize,
    /// Inbound frames per second per connection, 0 for unlimited ([`Dcrf::rate_limit`]).
    pub rate_limit: u32,
    /// Record metrics and serve them at `/metrics` ([`dcrf::metrics::install`]).
    pub metrics: bool,
}

/// The default database: a SQLite file in the working directory.
pub const DEFAULT_DATABASE: &str = "sqlite://dcrf-demo.sqlite3?mode=rwc";

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            jwt_secret: DEFAULT_JWT_SECRET.to_owned(),
            database: DEFAULT_DATABASE.to_owned(),
            seed: 0,
            layer: "memory".to_owned(),
            max_connections: dcrf::server::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: dcrf::server::DEFAULT_MAX_CONNECTIONS_PER_IP,
            rate_limit: 0,
            metrics: true,
        }
    }
}

/// Builds the demo's router and application settings.
pub async fn build(config: &DemoConfig) -> Result<(axum::Router, Dcrf), dcrf::Error> {
    let auth = JwtAuth::hs256(config.jwt_secret.as_bytes())?;
    let app = Dcrf::new()
        .authenticator(auth)
        .max_connections(config.max_connections)
        .max_connections_per_ip(config.max_connections_per_ip)
        .rate_limit(config.rate_limit);
    let layer = dcrf::channel::ChannelLayer::from_url(&config.layer).await?;
    let db = dcrf::model::Db::connect_with_layer(&config.database, layer).await?;
    todos::setup(&db, config.seed).await?;
    things::setup(&db).await?;
    let todos = todos::Todos::new(&db);
    let things = things::ThingsConsumer::new(&db);
    let things_with_id = things::ThingsWithIdConsumer::new(&db);
    let mux = {
        let (todos, things) = (todos.clone(), things.clone());
        Demultiplexer::new(&app)
            .stream("things", move || things.clone())
            .stream("things_with_id", move || things_with_id.clone())
            .stream("todos", move || todos.clone())
            .stream("echo", echo::Echo::default)
    };
    let api = api::consumer(db.clone());
    let mux = {
        let api = api.clone();
        mux.stream("api", move || api.clone())
    };
    let router = axum::Router::new()
        .route("/ws/echo/", app.consumer(echo::Echo::default))
        .route("/ws/todos/", app.consumer(move || todos.clone()))
        .route("/ws", mux.route())
        .route("/ws/api/", app.consumer(move || api.clone()))
        .merge(api::router(db))
        .merge(page::router());
    let router = if config.metrics {
        router.merge(dcrf::metrics::router(dcrf::metrics::install()?))
    } else {
        router
    };
    Ok((router, app))
}
