//! The one-block form: hooks and the three kinds of action in `impl Consumer for T`.

use dcrf::prelude::*;
use serde::Deserialize;

#[derive(Default)]
struct Greeter {
    greeted: u32,
}

#[derive(Deserialize)]
struct Greet {
    name: String,
}

type Connection = Ctx;

#[dcrf::consumer]
impl Consumer for Greeter {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(AllowAny))
    }

    async fn connect(&mut self, _ctx: &Ctx) -> Result<(), ApiError> {
        Ok(())
    }

    #[action]
    async fn greet(&mut self, args: Greet, frame: &Frame<'_>) -> Result<Reply<String>, ApiError> {
        self.greeted += 1;
        let rid = frame.request_id().map_or("null", |r| r.get()).to_owned();
        Ok(Reply::ok(format!(
            "Hello, {}! ({}, {rid})",
            args.name, self.greeted
        )))
    }

    #[action(detached)]
    async fn later(ctx: Connection, args: Greet) -> Result<Reply<String>, ApiError> {
        Ok(Reply::ok(format!(
            "{} on {}",
            args.name,
            ctx.connection_id()
        )))
    }

    #[action(blocking, name = "count")]
    fn count_blocking(args: Greet) -> Result<Reply<usize>, ApiError> {
        Ok(Reply::ok(args.name.len()))
    }
}

/// `::dcrf::consumer::Consumer` names the trait too; generics carry over.
struct Wrapper<T>(T);

#[dcrf::consumer]
impl<T: Clone + serde::Serialize + Send + Sync + 'static> ::dcrf::consumer::Consumer
    for Wrapper<T>
{
    #[action]
    async fn get(&self) -> Result<Reply<T>, ApiError> {
        Ok(Reply::ok(self.0.clone()))
    }
}

fn main() {
    let app = Dcrf::new();
    let _router: axum::Router = axum::Router::new()
        .route("/ws/greeter/", app.consumer(Greeter::default))
        .route("/ws/wrapper/", app.consumer(|| Wrapper(1u8)));
}
