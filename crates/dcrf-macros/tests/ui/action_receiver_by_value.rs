use dcrf::prelude::*;

struct Pinger;

#[dcrf::consumer]
impl Consumer for Pinger {
    #[action]
    async fn ping(self) -> Result<Reply<u8>, ApiError> {
        Ok(Reply::ok(1))
    }
}

fn main() {}
