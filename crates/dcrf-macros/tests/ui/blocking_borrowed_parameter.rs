use dcrf::prelude::*;

struct Jobs;

/// An alias hides nothing: the parameter is still borrowed.
type RawFrame<'a> = &'a Frame<'a>;

#[dcrf::consumer]
impl Consumer for Jobs {
    #[action(blocking)]
    fn size(frame: RawFrame<'_>) -> Result<Reply<usize>, ApiError> {
        Ok(Reply::ok(frame.fields().len()))
    }
}

fn main() {}
