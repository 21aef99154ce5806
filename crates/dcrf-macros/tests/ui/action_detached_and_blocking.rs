use dcrf::prelude::*;

struct Jobs;

#[dcrf::consumer]
impl Consumer for Jobs {
    #[action(detached, blocking)]
    async fn wait(ctx: Ctx) -> Result<Reply<u64>, ApiError> {
        Ok(Reply::ok(ctx.connection_id()))
    }
}

fn main() {}
