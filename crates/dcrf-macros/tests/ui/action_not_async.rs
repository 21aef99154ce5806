use dcrf::prelude::*;

struct Pinger;

#[dcrf::consumer]
impl Consumer for Pinger {
    #[action]
    fn ping(&mut self) -> Result<Reply<u8>, ApiError> {
        Ok(Reply::ok(1))
    }
}

fn main() {}
