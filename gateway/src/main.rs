//! `moge-gateway`: will serve the KServe v2 protocol in front of the router
//! and the expert groups.
//!
//! NOTE: the service is not built yet; this binary exits with status 2.

fn main() {
    println!(
        "moge-gateway {}: KServe v2 front not implemented yet; use `moge-ckpt run` for in-process inference",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
