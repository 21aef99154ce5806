use dcrf::prelude::*;

struct Todos;

#[dcrf::consumer(modle)]
impl Todos {}

impl Consumer for Todos {}

fn main() {}
