fn main() { eprintln!("kiln-agent: placeholder"); }
