#!/usr/bin/env python3
"""The load run of issue #4: 1000 connections held against a warm dockside for N minutes.

Starts Debian's docker-registry as the upstream (loopback), pushes two images, starts dockside
(the release binary) and warms it with a skopeo pull, then runs wrk with 1000 keep-alive
connections cycling through a manifest by tag, a manifest by digest, a small config blob and a
2 MiB layer. dockside's RSS, peak RSS and open file descriptors are read from /proc before,
every few seconds during, and after the run; errors are counted on both sides: wrk's socket
errors and non-2xx answers, and dockside's own error outcomes (/metrics) and warning lines.

    cargo build --release && python3 benches/load/soak.py [--minutes 10] [--connections 1000]
"""

import argparse
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402
from common import MiB, log  # noqa: E402

# wrk calls request() for every request; it walks the paths in turn, each thread on its own.
LUA = """
local paths = {%s}
local accept = "%s"
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i], { ["Accept"] = accept })
end
"""


def setup(st):
    up = c.start_registry(st, "upstream")
    content = st.dir("content")
    small = c.write_oci_layout(content / "small", "small", "v1", 1, [2 * MiB])
    medium = c.write_oci_layout(content / "medium", "medium", "v1", 2, [8 * MiB, 4 * MiB])
    for layout, img in ((content / "small", small), (content / "medium", medium)):
        c.push_image(up, layout, img)
    d = c.start_dockside(st, up)
    for img in (small, medium):  # a real client's pull warms tag, manifest and blobs
        c.skopeo(
            [
                "copy",
                "--src-tls-verify=false",
                f"docker://{d.host}/{img.name}:{img.tag}",
                f"oci:{st.dir('pulled')}:x",
            ]
        )
    paths = [
        f"/v2/{medium.name}/manifests/{medium.tag}",
        f"/v2/{medium.name}/manifests/{medium.digest}",
        f"/v2/{small.name}/blobs/{small.blobs[0][0]}",  # config, ~200 bytes
        f"/v2/{small.name}/blobs/{small.blobs[1][0]}",  # layer, 2 MiB
    ]
    return up, d, paths


def error_outcomes(d):
    """Sum of dockside_requests_total{outcome="error"} from its /metrics."""
    _, _, body = c.request(f"http://127.0.0.1:{d.extra['admin']}/metrics")
    total = 0
    for line in body.decode().splitlines():
        if line.startswith("dockside_requests_total{") and 'outcome="error"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def snapshot(d):
    s = c.proc_status(d.pid)
    s["error_outcomes"] = error_outcomes(d)
    s["log_warnings"] = len(re.findall(r"\b(WARN|ERROR)\b", d.log_text()))
    return s


class Sampler(threading.Thread):
    """Reads dockside's RSS and fd count every `every` seconds while the load runs."""

    def __init__(self, pid, every):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples = []
        self.stop = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.stop.wait(self.every):
            s = c.proc_status(self.pid)
            self.samples.append((time.monotonic() - t0, s["VmRSS"], s["fds"]))


def run_load(st, d, paths, args):
    script = st.tmp / "mix.lua"
    script.write_text(LUA % (", ".join(f'"{p}"' for p in paths), c.ACCEPT))
    sampler = Sampler(d.pid, args.sample_every)
    sampler.start()
    try:
        r = c.wrk(d.url + paths[0], args.connections, int(args.minutes * 60), 2, script=script,
                  timeout_s=30)
    finally:
        sampler.stop.set()
        sampler.join()
    return r, sampler.samples


def check_still_serving(d, paths):
    for p in paths:
        status, _, _ = c.request(d.url + p, headers={"Accept": c.ACCEPT})
        if status != 200:
            raise RuntimeError(f"after the load, {p} answered {status}")


def report(args, before, after, r, samples, settle):
    mib = lambda b: f"{b / MiB:.1f}"  # noqa: E731
    peak_rss = max([s[1] for s in samples] + [after["VmRSS"]])
    peak_fds = max([s[2] for s in samples] + [after["fds"]])
    e = r["errors"]
    lines = [
        f"Load run: {args.connections} connections for {args.minutes:g} min against a warm "
        f"dockside (pid {{pid}}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| | before | during (max) | after |",
        "|---|---|---|---|",
        f"| RSS (MiB) | {mib(before['VmRSS'])} | {mib(peak_rss)} | {mib(after['VmRSS'])} |",
        f"| peak RSS, VmHWM (MiB) | {mib(before['VmHWM'])} | | {mib(after['VmHWM'])} |",
        f"| open fds | {before['fds']} | {peak_fds} | {after['fds']} ({settle:.0f} s after) |",
        f"| dockside error outcomes (/metrics) | {before['error_outcomes']} | | "
        f"{after['error_outcomes']} |",
        f"| dockside WARN/ERROR log lines | {before['log_warnings']} | | "
        f"{after['log_warnings']} |",
        "",
        f"wrk: {r['requests']:,} requests in {r['seconds']:.0f} s ({r['rps']:,.0f} req/s, "
        f"{r['bytes_per_s'] / MiB:,.0f} MiB/s), p99 latency {r['p99']}; errors: non-2xx "
        f"{e['non2xx']}, connect {e['connect']}, read {e['read']}, write {e['write']}, "
        f"timeout {e['timeout']}.",
        "",
        "RSS / fds over time (s: MiB, fds): "
        + ", ".join(f"{t:.0f}: {mib(rss)}, {fds}" for t, rss, fds in thin(samples, 12)),
    ]
    return "\n".join(lines) + "\n"


def thin(samples, n):
    step = max(1, len(samples) // n)
    return samples[::step]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--out", help="also write the markdown report to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = ap.parse_args()
    limit = c.raise_fd_limit()
    if limit < args.connections * 2 + 100:
        raise SystemExit(f"open-file limit {limit} is too low for {args.connections} connections")
    with c.Stack(keep=args.keep) as st:
        _, d, paths = setup(st)
        before = snapshot(d)
        log(f"== {args.connections} connections for {args.minutes:g} min")
        r, samples = run_load(st, d, paths, args)
        settle = 5.0
        time.sleep(settle)  # let the closed client sockets leave dockside's table
        after = snapshot(d)
        check_still_serving(d, paths)
        text = report(args, before, after, r, samples, settle).replace("{pid}", str(d.pid))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    c.run_main(main)
