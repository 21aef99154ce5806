use dcrf::prelude::*;

struct Pinger;

#[dcrf::consumer]
impl Consumer for Pinger {
    #[action]
    async fn ping(&mut self) -> Result<Reply<u8>, ApiError> {
        Ok(Reply::ok(1))
    }

    #[action(name = "ping")]
    async fn ping_again(&mut self) -> Result<Reply<u8>, ApiError> {
        Ok(Reply::ok(2))
    }
}

fn main() {}
