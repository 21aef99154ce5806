//! The README's Greeter as a complete server: one consumer, signed-in users only.
//!
//! ```sh
//! DCRF_JWT_SECRET=change-me cargo run -p dcrf --example greeter -- 127.0.0.1:8000
//! ```
//!
//! Connect to `ws://127.0.0.1:8000/ws/greeter/` with `Authorization: Bearer <JWT>` (or, from a
//! browser, `?token=<JWT>`) and send `{"action": "greet", "name": "Ada", "request_id": 1}`.
//! Without a token the socket opens, but every action answers 403. Started without
//! `DCRF_JWT_SECRET`, the server logs a token you can try.

use dcrf::prelude::*;
use serde::Deserialize;

/// One value per connection: its fields are that connection's state.
#[derive(Default)]
struct Greeter {
    greeted: u32,
}

/// The fields an action reads from the message, by name.
#[derive(Deserialize)]
struct Greet {
    name: String,
}

#[dcrf::consumer]
impl Consumer for Greeter {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(IsAuthenticated))
    }

    /// {"action": "greet", "name": "Ada", "request_id": 1}
    #[action]
    async fn greet(&mut self, args: Greet) -> Result<Reply<String>, ApiError> {
        self.greeted += 1;
        let greeting = format!("Hello, {}! (#{})", args.name, self.greeted);
        Ok(Reply::ok(greeting))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs go to stderr (stdout carries only the "listening on" line). Server errors, such as
    // a failing action, are logged here: without a subscriber you would not see them.
    // `RUST_LOG=debug` shows more.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    // The HS256 secret tokens are signed with; without one, a development secret anyone knows.
    let secret = std::env::var("DCRF_JWT_SECRET").unwrap_or_default();
    let auth = if secret.is_empty() {
        tracing::warn!(
            "DCRF_JWT_SECRET is not set: using the built-in DEVELOPMENT secret, which anyone can \
             sign tokens with. Never run like this outside your machine."
        );
        let auth = dcrf::auth::JwtAuth::hs256(b"dcrf-examples-development-secret")?;
        // Your login endpoint would issue tokens; here is one to try (user "ada", one hour).
        tracing::info!(token = %auth.issue("1", "ada", 3600)?, "a development token");
        auth
    } else {
        dcrf::auth::JwtAuth::hs256(secret.as_bytes())?
    };

    // Application settings (here: who the user is); `consumer` mounts a consumer type on a
    // route, building a fresh `Greeter` for each connection.
    let app = Dcrf::new().authenticator(auth);
    let router = axum::Router::new().route("/ws/greeter/", app.consumer(Greeter::default));

    // The address: the first argument, else DCRF_ADDR, else 127.0.0.1:8000 (port 0 picks one).
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("DCRF_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:8000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);

    // Serves until ctrl-c, then closes every socket (code 1001) once its current action is done.
    dcrf::serve(listener, router, &app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
