//! The expert service: `moge.v1.ExpertGroup` and `moge.v1.Host` over one
//! expert group, or the shared expert, of one or more layers. The
//! `moge-expert` binary serves it alone; the gateway's embedded mode serves
//! every group in its own process.

mod metrics;
mod service;

use moge_shared::proto::moge::v1::expert_group_server::ExpertGroupServer;
use moge_shared::proto::moge::v1::host_server::HostServer;
pub use service::{ExpertOptions, ExpertService, Hosted};

/// gRPC service name whose health reflects this service.
pub const SERVICE_NAME: &str = "moge.v1.ExpertGroup";

/// Builds the gRPC routes of the service with message limits of `max_message_bytes`.
pub fn routes(service: ExpertService, max_message_bytes: usize) -> tonic::service::Routes {
    let expert = ExpertGroupServer::new(service.clone())
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    tonic::service::Routes::new(expert).add_service(HostServer::new(service))
}
