//! `moge-expert`: will host one expert group, or the shared expert, over gRPC.
//!
//! NOTE: the service is not built yet; this binary exits with status 2.

fn main() {
    let config = moge_shared::checkpoint::Preset::Small.config();
    println!(
        "moge-expert {}: gRPC service not implemented yet (small preset: {} experts per group)",
        env!("CARGO_PKG_VERSION"),
        config.experts_per_group()
    );
    std::process::exit(2);
}
