//! End-to-end tests: the real `dockside` binary between Debian's docker-registry (the upstream)
//! and real clients (skopeo, reqwest, containerd, podman, dockerd). See tests/README.md.

mod support;

mod airgap;
mod cache;
mod client_auth;
mod cluster;
mod credentials;
mod disk_full;
mod errors;
mod faults;
mod harness;
mod lifecycle;
mod limits;
mod measure;
mod pull;
mod real_clients;
mod robustness;
mod routing;
mod shared_tier;
mod status_page;
mod tls;
