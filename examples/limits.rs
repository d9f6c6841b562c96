//! Prints every adapter and the limits featreplay requests on the chosen one.
fn main() -> Result<(), featreplay::Error> {
    for a in featreplay::gpu::list_adapters() {
        println!("{a}");
    }
    let gpu = featreplay::Gpu::open_default()?;
    println!("chosen: {}\n{:#?}", gpu.adapter(), gpu.limits());
    Ok(())
}
