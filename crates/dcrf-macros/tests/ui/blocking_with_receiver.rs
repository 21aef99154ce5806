use dcrf::prelude::*;

struct Jobs;

#[dcrf::consumer]
impl Consumer for Jobs {
    #[action(blocking)]
    fn checksum(&self) -> Result<Reply<u64>, ApiError> {
        Ok(Reply::ok(31))
    }
}

fn main() {}
