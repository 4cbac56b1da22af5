//! The `moge.v1.Router` and `moge.v1.Host` services.

use std::collections::BTreeMap;
use std::sync::Arc;

use moge_shared::checkpoint::{Checkpoint, CheckpointError};
use moge_shared::kernels::Kernel;
use moge_shared::proto::moge::v1::{
    self as wire_v1, DataType, DescribeRequest, DescribeResponse, Role, RouteRequest, RouteResponse,
};
use moge_shared::routing::{Router, RoutingError};
use moge_shared::wire::{self, encode_f32s, encode_u32s};
use moge_shared::{RoutingMode, RoutingOptions};
use tonic::{Request, Response, Status};

use crate::metrics::RouterMetrics;

/// Router weights of the hosted layers, shared by all request tasks.
#[derive(Clone)]
pub struct RouterService {
    inner: Arc<Inner>,
}

struct Inner {
    routers: BTreeMap<usize, Arc<Router>>,
    default_mode: RoutingMode,
    renormalize: bool,
    kernel: Kernel,
    num_groups: usize,
    top_k: usize,
    hidden_size: usize,
    replica: String,
    metrics: RouterMetrics,
}

impl RouterService {
    /// Loads the router tensors of `layers`, and nothing else.
    pub fn load(
        checkpoint: &Checkpoint,
        layers: &[usize],
        default_mode: RoutingMode,
        replica: String,
    ) -> Result<Self, CheckpointError> {
        let mut routers = BTreeMap::new();
        for &layer in layers {
            routers.insert(layer, Arc::new(checkpoint.load_router(layer)?));
        }
        let config = checkpoint.config();
        Ok(RouterService {
            inner: Arc::new(Inner {
                routers,
                default_mode,
                renormalize: config.norm_topk_prob,
                kernel: Kernel::detect(),
                num_groups: config.num_groups(),
                top_k: config.num_experts_per_tok,
                hidden_size: config.hidden_size,
                metrics: RouterMetrics::new(default_mode.as_str(), &replica),
                replica,
            }),
        })
    }
}

/// Largest router matmul, in multiply-adds, that runs on the I/O thread:
/// about 50 µs on one AVX2 core, the order of a hand-off to another thread.
const INLINE_ROUTING_MULTIPLY_ADDS: usize = 1 << 20;

impl RouterService {
    /// Bytes of hosted router weights: the gate matrix and the router scale of every layer.
    pub fn weight_bytes(&self) -> usize {
        self.inner
            .routers
            .values()
            .map(|router| router.gate().bytes() + router.shape().num_experts * std::mem::size_of::<f32>())
            .sum()
    }
}

fn mode_of(value: i32, default: RoutingMode) -> Result<RoutingMode, Status> {
    match wire_v1::RoutingMode::try_from(value) {
        Ok(wire_v1::RoutingMode::Unspecified) => Ok(default),
        Ok(wire_v1::RoutingMode::Moge) => Ok(RoutingMode::Moge),
        Ok(wire_v1::RoutingMode::TopK) => Ok(RoutingMode::TopK),
        Ok(wire_v1::RoutingMode::GroupLimited) => Ok(RoutingMode::GroupLimited),
        Err(_) => Err(Status::invalid_argument(format!(
            "mode: {value} is not a routing mode, expected 0 (default), 1 (moge), 2 (top-k) or 3 (group-limited)"
        ))),
    }
}

fn wire_mode(mode: RoutingMode) -> wire_v1::RoutingMode {
    match mode {
        RoutingMode::Moge => wire_v1::RoutingMode::Moge,
        RoutingMode::TopK => wire_v1::RoutingMode::TopK,
        RoutingMode::GroupLimited => wire_v1::RoutingMode::GroupLimited,
    }
}

#[tonic::async_trait]
impl wire_v1::router_server::Router for RouterService {
    async fn route(&self, request: Request<RouteRequest>) -> Result<Response<RouteResponse>, Status> {
        let request = request.into_inner();
        let inner = &self.inner;
        let layer = request.layer as usize;
        let Some(router) = inner.routers.get(&layer).cloned() else {
            let hosted: Vec<&usize> = inner.routers.keys().collect();
            tracing::debug!(layer, "route request for a layer not hosted");
            return Err(Status::not_found(format!(
                "layer: {layer} is not hosted, expected one of {hosted:?}"
            )));
        };
        let mode = mode_of(request.mode, inner.default_mode)?;
        let tensor = request
            .hidden_states
            .ok_or_else(|| Status::invalid_argument("hidden_states: missing, expected a [T, H] tensor"))?;
        let (tokens, hidden) = wire::decode_matrix("hidden_states", &tensor, inner.hidden_size)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let span = tracing::Span::current();
        span.record("moge.layer", layer);
        span.record("moge.tokens", tokens);
        let options = RoutingOptions {
            mode,
            renormalize: request.renormalize.unwrap_or(inner.renormalize),
        };

        // Routing a large batch takes milliseconds: keep it off the I/O
        // threads. A small one costs less than the hop to another thread.
        let kernel = inner.kernel;
        let multiply_adds = tokens * router.shape().num_experts * inner.hidden_size;
        let routing = if multiply_adds <= INLINE_ROUTING_MULTIPLY_ADDS {
            router.route(kernel, &hidden, tokens, options)
        } else {
            tokio::task::spawn_blocking(move || router.route(kernel, &hidden, tokens, options))
                .await
                .map_err(|error| Status::internal(format!("routing task failed: {error}")))?
        };
        let routing = routing.map_err(|error| match error {
            RoutingError::NonFiniteLogit { .. } => Status::invalid_argument(format!("hidden_states: {error}")),
            other => Status::internal(other.to_string()),
        })?;
        let imbalance_score = routing.imbalance_score_per_group();
        inner.metrics.record(
            layer,
            mode.as_str(),
            tokens,
            imbalance_score,
            &routing.group_assignments,
        );
        tracing::debug!(layer, tokens, mode = %mode, imbalance_score, "routed");
        Ok(Response::new(RouteResponse {
            tokens: tokens as u32,
            top_k: routing.top_k as u32,
            expert_ids: encode_u32s(&routing.expert_ids),
            expert_weights: encode_f32s(&routing.expert_weights),
            imbalance_score,
            group_assignments: routing.group_assignments,
            mode: wire_mode(mode) as i32,
        }))
    }
}

#[tonic::async_trait]
impl wire_v1::host_server::Host for RouterService {
    async fn describe(&self, _request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        let inner = &self.inner;
        Ok(Response::new(DescribeResponse {
            role: Role::Router as i32,
            layers: inner.routers.keys().map(|&layer| layer as u32).collect(),
            group: None,
            first_expert: 0,
            num_experts: inner
                .routers
                .values()
                .next()
                .map_or(0, |router| router.shape().num_experts as u32),
            weight_dtype: DataType::F32 as i32,
            hidden_size: inner.hidden_size as u32,
            num_groups: inner.num_groups as u32,
            top_k: inner.top_k as u32,
            replica: inner.replica.clone(),
            default_mode: wire_mode(inner.default_mode) as i32,
        }))
    }
}
