use dcrf::prelude::*;

struct Pinger;

#[dcrf::consumer]
impl Consumer for Pinger {
    #[action]
    async fn ping(ctx: Ctx) -> Result<Reply<u64>, ApiError> {
        Ok(Reply::ok(ctx.connection_id()))
    }
}

fn main() {}
