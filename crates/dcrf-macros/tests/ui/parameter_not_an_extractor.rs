use dcrf::prelude::*;

struct Pinger;

/// Neither `serde::Deserialize` nor `FromFrame`.
struct Count(u64);

#[dcrf::consumer]
impl Consumer for Pinger {
    #[action]
    async fn ping(&mut self, count: Count) -> Result<Reply<u64>, ApiError> {
        Ok(Reply::ok(count.0))
    }
}

fn main() {}
