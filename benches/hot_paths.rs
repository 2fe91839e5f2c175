//! Criterion benchmarks of the per-request hot pieces: hashing blob bytes, parsing digests and
//! routes, negotiating Accept. Run with `cargo bench --bench hot_paths`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dockside::oci::Digest;
use dockside::oci::digest::DigestVerifier;
use dockside::oci::media::AcceptSet;
use dockside::oci::route;
use http::Method;

const DIGEST: &str = "sha256:4bcff63911fcb4448bd4fdacec207030997caf25e9bea4045fa6c8c44de311d1";

fn hashing(c: &mut Criterion) {
    let chunk = vec![0x5au8; 1024 * 1024];
    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.bench_function("sha256 1 MiB", |b| {
        b.iter(|| {
            let mut verifier = DigestVerifier::new();
            verifier.update(black_box(&chunk));
            verifier.finish()
        })
    });
    group.finish();
}

fn parsing(c: &mut Criterion) {
    c.bench_function("digest parse", |b| {
        b.iter(|| Digest::parse(black_box(DIGEST)))
    });
    let blob = format!("/v2/library/nginx/blobs/{DIGEST}");
    c.bench_function("route blob with ns", |b| {
        b.iter(|| route::parse(&Method::GET, black_box(&blob), Some("ns=docker.io")))
    });
    c.bench_function("route manifest by tag", |b| {
        b.iter(|| {
            route::parse(
                &Method::HEAD,
                black_box("/v2/ghcr.io/owner/app/manifests/v1.2.3"),
                None,
            )
        })
    });
    let accept = [
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json, */*",
    ];
    c.bench_function("accept negotiation", |b| {
        b.iter(|| AcceptSet::from_headers(black_box(accept).into_iter()))
    });
}

criterion_group!(benches, hashing, parsing);
criterion_main!(benches);
