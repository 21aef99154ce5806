struct Todos;

#[dcrf::consumer]
impl std::fmt::Debug for Todos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Todos")
    }
}

fn main() {}
