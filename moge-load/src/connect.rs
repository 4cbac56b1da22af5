//! gRPC connections to the gateway with the token and TLS settings of
//! [`ClientSecurity`].

use std::time::Duration;

use anyhow::Context;
use moge_ctl::client::ClientSecurity;
use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A KServe client whose every call carries the `authorization` metadata.
pub type Client = GrpcInferenceServiceClient<InterceptedService<Channel, AddAuthorization>>;

/// Adds `authorization: Bearer TOKEN` to every call, when a token is set.
#[derive(Clone)]
pub struct AddAuthorization {
    value: Option<AsciiMetadataValue>,
}

impl AddAuthorization {
    /// Takes the token of `security`, if any.
    pub fn new(security: &ClientSecurity) -> anyhow::Result<AddAuthorization> {
        let value = match security.authorization() {
            Some(authorization) => {
                // The token is visible ASCII (checked when read), so this
                // fails only on a bug. The message leaves the value out.
                let mut value: AsciiMetadataValue = MetadataValue::try_from(authorization.value())
                    .map_err(|_| anyhow::anyhow!("--auth-token-file: the token is not a valid metadata value"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(AddAuthorization { value })
    }
}

impl Interceptor for AddAuthorization {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Builds the endpoint of `url` (from [`ClientSecurity::url`]) with TLS
/// when it is `https://`.
pub fn endpoint(security: &ClientSecurity, url: &str) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("--target {url:?} is not a valid address"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(moge_shared::service::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(moge_shared::service::HTTP2_CONNECTION_WINDOW_BYTES)
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = security.tls() {
        // tonic parses the PEM again, but ClientSecurity::load already checked
        // every file, so errors there name the flag.
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca_pem()));
        if let Some((cert, key)) = tls.identity_pem() {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(config)
            .with_context(|| format!("failed to configure TLS for --target {url:?}"))?;
    }
    Ok(endpoint)
}

/// Wraps `channel` in a client that sends the token and allows messages
/// of up to `max_message_bytes`.
pub fn client(channel: Channel, authorization: AddAuthorization, max_message_bytes: usize) -> Client {
    GrpcInferenceServiceClient::with_interceptor(channel, authorization)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}
