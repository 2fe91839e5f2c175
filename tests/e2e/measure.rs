//! Wall-time figures for the closing notes (printed with `MEASURE`; run with `--nocapture`):
//! a ~50 MB 3-layer image pulled with skopeo straight from the upstream, cold through dockside
//! and warm through dockside. Only correctness is asserted; the times are reported.

use std::time::Duration;

use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry};
use crate::support::{serial, skopeo};

fn timed_pull(host: &str, img: &Image) -> Duration {
    let out = tempfile::tempdir().unwrap();
    let r = skopeo::pull(
        &format!("{host}/library/big:v1"),
        &format!("oci:{}:x", out.path().display()),
        &[],
    );
    r.assert_ok();
    skopeo::assert_layout_has_image(out.path(), &skopeo::layout_top(out.path()), img, true);
    r.elapsed
}

fn secs(d: &[Duration]) -> String {
    d.iter()
        .map(|d| format!("{:.2}s", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" / ")
}

#[test]
fn measure_cold_and_warm_pull_against_direct() {
    let _heavy = serial::heavy();
    let reg = Registry::start(Auth::None);
    let img = Image::generate(900, &[30 << 20, 15 << 20, 5 << 20], Format::Oci);
    skopeo::push(&reg, "library/big", "v1", &img);

    const ROUNDS: usize = 5;
    let direct: Vec<Duration> = (0..ROUNDS).map(|_| timed_pull(&reg.host(), &img)).collect();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..ROUNDS {
        // A fresh dockside (empty cache) each round: one cold pull, then one warm.
        let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
        cold.push(timed_pull(&d.host(), &img));
        let before = reg.access_log().len();
        warm.push(timed_pull(&d.host(), &img));
        assert_eq!(
            reg.access_log().len(),
            before,
            "warm pull asked the upstream"
        );
    }
    let median = |v: &[Duration]| {
        let mut sorted = v.to_vec();
        sorted.sort();
        sorted[sorted.len() / 2].as_secs_f64()
    };
    eprintln!(
        "MEASURE pull of a {:.1} MB 3-layer image with skopeo: direct from upstream {}; \
         cold via dockside {}; warm via dockside {}; cold/direct {:.2}x, warm/direct {:.2}x (medians)",
        img.layer_bytes() as f64 / 1e6,
        secs(&direct),
        secs(&cold),
        secs(&warm),
        median(&cold) / median(&direct),
        median(&warm) / median(&direct),
    );
}
