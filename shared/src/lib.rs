//! The numeric core of moge-serve: model configuration, MoGE routing, expert
//! kernels and checkpoint loading, shared by the router, expert and gateway
//! services so that each service stays a thin shell around this crate.
//!
//! A layer runs in stages that mirror the services:
//!
//! 1. [`routing::Router::route`] computes `router_logits = W_gate x`, a
//!    global softmax, and picks each token's experts (MoGE by default).
//! 2. [`expert::ExpertGroup::forward`] runs one group's experts on a ragged
//!    list of `(token row, expert, weight)` assignments.
//! 3. [`expert::Expert::forward_dense`] runs the shared expert on every token.
//! 4. The caller sums the partial outputs; [`layer::MoeLayer`] does all of it
//!    in one process and is the in-process reference path.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod expert;
pub mod kernels;
pub mod layer;
pub mod memory;
pub mod proto;
pub mod routing;
pub mod service;
pub mod settings;
pub mod tls;
pub mod weights;
pub mod wire;

pub use config::{ConfigError, ModelConfig};
pub use dtype::DType;
pub use routing::{Routing, RoutingMode, RoutingOptions};
