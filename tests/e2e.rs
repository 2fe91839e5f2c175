//! End-to-end tests: the real `dockside` binary between Debian's docker-registry (the upstream)
//! and real clients (skopeo, reqwest, containerd, podman, dockerd). See tests/README.md.

#[path = "e2e/support/mod.rs"]
mod support;

#[path = "e2e/harness.rs"]
mod harness;

#[path = "e2e/pull.rs"]
mod pull;

#[path = "e2e/cache.rs"]
mod cache;

#[path = "e2e/routing.rs"]
mod routing;

#[path = "e2e/errors.rs"]
mod errors;

#[path = "e2e/real_clients.rs"]
mod real_clients;

#[path = "e2e/measure.rs"]
mod measure;

#[path = "e2e/robustness.rs"]
mod robustness;

#[path = "e2e/lifecycle.rs"]
mod lifecycle;

#[path = "e2e/faults.rs"]
mod faults;

#[path = "e2e/airgap.rs"]
mod airgap;
#[path = "e2e/client_auth.rs"]
mod client_auth;
#[path = "e2e/limits.rs"]
mod limits;
#[path = "e2e/tls.rs"]
mod tls;

#[path = "e2e/credentials.rs"]
mod credentials;

#[path = "e2e/disk_full.rs"]
mod disk_full;
