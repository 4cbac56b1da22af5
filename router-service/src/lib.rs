//! The router service: `moge.v1.Router` and `moge.v1.Host` over the router
//! tensors of one or more layers. The `moge-router` binary serves it alone;
//! the gateway's embedded mode serves it in its own process.

mod metrics;
mod service;

use moge_shared::proto::moge::v1::host_server::HostServer;
use moge_shared::proto::moge::v1::router_server::RouterServer;
pub use service::RouterService;

/// gRPC service name whose health reflects this service.
pub const SERVICE_NAME: &str = "moge.v1.Router";

/// Builds the gRPC routes of the router with message limits of `max_message_bytes`.
pub fn routes(service: RouterService, max_message_bytes: usize) -> tonic::service::Routes {
    let router = RouterServer::new(service.clone())
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    tonic::service::Routes::new(router).add_service(HostServer::new(service))
}
