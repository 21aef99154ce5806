#[dcrf::consumer]
struct Todos;

fn main() {}
