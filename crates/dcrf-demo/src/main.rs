//! `dcrf-demo`: the dcrf showcase server.
//!
//! ```text
//! dcrf-demo --bind 127.0.0.1:8000
//! ```

use std::io::Write;

use clap::Parser;
use dcrf_demo::{DEFAULT_DATABASE, DEFAULT_JWT_SECRET, DemoConfig, check_jwt_secret};

/// The dcrf demo server: DCRF's JSON protocol over WebSockets.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    bind: String,
    /// Shared secret for HS256 JWTs sent as `Authorization: Bearer` or `?token=`.
    #[arg(long, env = "DCRF_DEMO_JWT_SECRET", default_value = DEFAULT_JWT_SECRET)]
    jwt_secret: String,
    /// Database URL: a SQLite file (the default, in the working directory), `sqlite::memory:`,
    /// or `postgres://user@host/db`.
    #[arg(long, env = "DCRF_DEMO_DATABASE", default_value = DEFAULT_DATABASE)]
    database: String,
    /// Channel layer: `memory` (this process only) or `redis://host:port` (several servers
    /// sharing subscriptions).
    #[arg(long, env = "DCRF_DEMO_LAYER", default_value = "memory")]
    layer: String,
    /// Insert this many todos at start ("Todo 1", "Todo 2", ...).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The most connections served at once; more are answered HTTP 503.
    #[arg(long, env = "DCRF_DEMO_MAX_CONNECTIONS", default_value_t = dcrf::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// The most connections from one client IP address; more are answered HTTP 503.
    #[arg(long, env = "DCRF_DEMO_MAX_CONNECTIONS_PER_IP", default_value_t = dcrf::server::DEFAULT_MAX_CONNECTIONS_PER_IP)]
    max_connections_per_ip: usize,
    /// Inbound frames per second per connection (0: unlimited, the default); a frame over the
    /// limit is answered 429 "Request was throttled. Expected available in N seconds.".
    #[arg(long, env = "DCRF_DEMO_RATE_LIMIT", default_value_t = 0)]
    rate_limit: u32,
    /// Do not record metrics nor serve `/metrics` (for measuring their overhead).
    #[arg(long)]
    no_metrics: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs go to stderr; stdout carries only the "listening on" and "stopped" lines.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let listener = listen(&args.bind).await?;
    let addr = listener.local_addr()?;
    if let Err(refusal) = check_jwt_secret(&args.jwt_secret, addr) {
        tracing::error!("{refusal}");
        std::process::exit(2);
    }
    if args.jwt_secret == DEFAULT_JWT_SECRET {
        tracing::warn!(
            "serving with the built-in JWT secret: fine on loopback, never in production \
             (set --jwt-secret or DCRF_DEMO_JWT_SECRET)"
        );
    }
    let config = DemoConfig {
        jwt_secret: args.jwt_secret,
        database: args.database,
        seed: args.seed,
        layer: args.layer,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        rate_limit: args.rate_limit,
        metrics: !args.no_metrics,
    };
    let (router, app) = dcrf_demo::build(&config).await?;
    let shutdown = shutdown_signal();
    // Scripts read this line to find the address (port 0 picks one).
    let mut out = std::io::stdout();
    let _ = writeln!(out, "dcrf-demo listening on {addr}");
    let _ = out.flush();
    dcrf::serve(listener, router, &app, shutdown).await?;
    // The reader may be gone by now; a closed stdout is not an error.
    let _ = writeln!(out, "dcrf-demo stopped");
    Ok(())
}

/// Completes on SIGTERM or ctrl-c. The handlers are registered when this is called, not when
/// the future is first polled: a signal sent right after the "listening" line is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The accept queue asked for: the kernel caps it at `net.core.somaxconn` (4,096 on recent
/// kernels). `TcpListener::bind` asks for 128, which a burst of handshakes (clients coming back
/// after a restart) overflows: the kernel then drops SYNs and clients retry after 1, 3, 7 s.
const LISTEN_BACKLOG: u32 = 4096;

/// Listens on the first address `bind` resolves to, with [`LISTEN_BACKLOG`].
async fn listen(bind: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(bind).await?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no address for {bind}"),
        )
    })?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted server may bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
