//! dockside: a pull-through caching mirror for OCI / Docker registries.
//!
//! Data flows one way: a request is parsed at the edge ([`oci::route`]) into validated types,
//! [`upstream::Upstreams`] picks the upstream, [`mirror::Mirror`] answers from the content-addressed
//! [`store`] or starts one upstream fill per digest ([`fill`]), and [`server`] writes the bytes to
//! the client through pingora. See ARCHITECTURE.md for the full map and its invariants.

#[cfg(feature = "server")]
pub mod admin;
pub mod airgap;
pub mod breaker;
pub mod client_auth;
pub mod client_config;
pub mod cluster;
pub mod config;
pub mod error;
pub mod fill;
pub mod inventory;
#[cfg(feature = "server")]
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod origin;
pub mod preflight;
#[cfg(feature = "server")]
pub mod server;
pub mod shared;
pub mod singleflight;
pub mod status;
pub mod store;
pub mod tags;
pub mod tls;
pub mod upstream;
