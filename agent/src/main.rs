mod export;
mod process;
mod protocols;
mod spans;
mod stats;

fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent"));
    println!("{}", obj.len());
}
