use dcrf::extract::FromFrame;
use dcrf::prelude::*;

struct Jobs;

/// The action's name, borrowed from the frame.
struct ActionName<'a>(&'a str);

impl<'a> FromFrame<'a> for ActionName<'a> {
    fn from_frame(_ctx: &'a Ctx, frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        Ok(ActionName(frame.action_str().unwrap_or_default()))
    }
}

#[dcrf::consumer]
impl Consumer for Jobs {
    #[action(detached)]
    async fn echo_name(name: ActionName<'_>) -> Result<Reply<String>, ApiError> {
        Ok(Reply::ok(name.0.to_owned()))
    }
}

fn main() {}
