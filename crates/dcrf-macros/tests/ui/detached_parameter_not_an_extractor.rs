use dcrf::prelude::*;

struct Jobs;

/// Neither `serde::Deserialize` nor `FromFrame`.
struct Wait(u64);

#[dcrf::consumer]
impl Consumer for Jobs {
    #[action(detached)]
    async fn wait(args: Wait) -> Result<Reply<u64>, ApiError> {
        Ok(Reply::ok(args.0))
    }
}

fn main() {}
