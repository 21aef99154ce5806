//! `/ws/echo/`: the smallest consumer, and the target of the echo benchmarks.

use dcrf::prelude::*;
use dcrf::protocol::FieldsObject;

/// Echoes messages back and tells who is connected.
#[derive(Debug, Default)]
pub struct Echo;

#[dcrf::consumer]
impl Echo {
    /// Returns every field of the message except `action` and `request_id`, status 200.
    #[action]
    async fn echo<'f>(
        &mut self,
        frame: &'f Frame<'f>,
    ) -> Result<Reply<FieldsObject<'f, 'f>>, ApiError> {
        Ok(Reply::ok(frame.fields_object()))
    }

    /// Returns the authenticated user, or null.
    #[action]
    async fn whoami(&mut self, ctx: &Ctx) -> Result<Reply<Option<User>>, ApiError> {
        Ok(Reply::ok(ctx.user().cloned()))
    }
}

impl Consumer for Echo {}
