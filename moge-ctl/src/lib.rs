//! Client-side pieces that `moge-ctl` and `moge-load` share: the bearer
//! token and TLS settings for reaching a gateway, gateway address parsing
//! and the balance report fetch.

pub mod client;
