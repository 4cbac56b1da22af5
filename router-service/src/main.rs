//! `moge-router`: will serve the routing of a batch over gRPC.
//!
//! NOTE: the service is not built yet; this binary only reports what the
//! checkpoint's router would load, so the workspace has its final shape.

fn main() {
    let shape = moge_shared::checkpoint::Preset::Small.config();
    println!(
        "moge-router {}: gRPC service not implemented yet (small preset: {} experts in {} groups)",
        env!("CARGO_PKG_VERSION"),
        shape.num_experts,
        shape.num_groups()
    );
    std::process::exit(2);
}
