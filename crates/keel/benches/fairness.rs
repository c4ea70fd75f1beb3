//! The fairness run (being written).
fn main() {}
