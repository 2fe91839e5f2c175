"""Checks of the benchmark's own parsing and content generation, on output captured from the
real tools: `python3 -m unittest discover -s benches/load`."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
import unittest.mock
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import common as c  # noqa: E402
import shaped  # noqa: E402

# wrk 4.1 (Debian 12) against a 404, so the non-2xx line is there.
WRK_404 = """Running 1s test @ http://127.0.0.1:60045/v2/nope/blobs/sha256:e6c6
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.15ms    6.38ms  54.46ms   90.40%
    Req/Sec   515.40    160.39   757.00     70.00%
  Latency Distribution
     50%    2.98ms
     75%    6.09ms
     90%   11.27ms
     99%   31.25ms
  518 requests in 1.01s, 169.46KB read
  Non-2xx or 3xx responses: 518
Requests/sec:    511.10
Transfer/sec:    167.21KB
"""

WRK_SOCKET_ERRORS = """  1000 connections
  12 requests in 2.00m, 1.50GB read
  Socket errors: connect 3, read 4, write 5, timeout 6
"""

# docker-registry 2.8's access log (combined format).
ACCESS_LOG = (
    '127.0.0.1 - - [22/Nov/2026:10:51:11 +0000] "GET /v2/ HTTP/1.1" 200 2 "" ""\n'
    'time="2026-11-22T10:51:11Z" level=warning msg="not an access line"\n'
    '127.0.0.1 - - [22/Nov/2026:10:51:11 +0000] "GET /v2/x/blobs/sha256:e6c6?ns=a HTTP/1.1" '
    '200 524288000 "" "Go-http-client/1.1"\n'
    '127.0.0.1 - - [22/Nov/2026:10:51:11 +0000] "HEAD /v2/x/manifests/v1 HTTP/1.1" 200 - "" ""\n'
)


class WrkOutput(unittest.TestCase):
    def test_counts_rates_and_non_2xx(self):
        r = c.parse_wrk(WRK_404)
        self.assertEqual(r["requests"], 518)
        self.assertAlmostEqual(r["seconds"], 1.01)
        self.assertAlmostEqual(r["rps"], 518 / 1.01)
        self.assertAlmostEqual(r["bytes_per_s"], 169.46 * 1024 / 1.01)
        self.assertEqual(r["errors"]["non2xx"], 518)
        self.assertEqual(r["p99"], "31.25ms")

    def test_socket_errors_and_minutes(self):
        r = c.parse_wrk(WRK_SOCKET_ERRORS)
        self.assertAlmostEqual(r["seconds"], 120.0)
        self.assertAlmostEqual(r["bytes_per_s"], 1.5 * (1 << 30) / 120)
        self.assertEqual(
            r["errors"], {"non2xx": 0, "connect": 3, "read": 4, "write": 5, "timeout": 6}
        )

    def test_unreadable_output_is_an_error(self):
        with self.assertRaises(RuntimeError):
            c.parse_wrk("wrk: connection refused\n")


class AccessLog(unittest.TestCase):
    def test_method_path_status_and_bytes(self):
        got = [m.groups() for m in c.ACCESS_RE.finditer(ACCESS_LOG)]
        self.assertEqual(
            got,
            [
                ("GET", "/v2/", "200", "2"),
                ("GET", "/v2/x/blobs/sha256:e6c6?ns=a", "200", "524288000"),
                ("HEAD", "/v2/x/manifests/v1", "200", "-"),
            ],
        )


class Content(unittest.TestCase):
    def test_oci_layout_holds_the_image_it_describes(self):
        with tempfile.TemporaryDirectory() as d:
            layout = Path(d)
            img = c.write_oci_layout(layout, "t", "v1", 7, [1000, 70_000])
            blobs = layout / "blobs" / "sha256"
            for p in blobs.iterdir():
                self.assertEqual(hashlib.sha256(p.read_bytes()).hexdigest(), p.name)
            index = json.loads((layout / "index.json").read_text())
            self.assertEqual(index["manifests"][0]["digest"], img.digest)
            manifest = json.loads((blobs / img.digest[7:]).read_text())
            self.assertEqual(
                [(m["digest"], m["size"]) for m in [manifest["config"], *manifest["layers"]]],
                img.blobs,
            )
            layer = (blobs / img.blobs[2][0][7:]).read_bytes()
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as t:
                member = t.getmembers()[0]
                self.assertEqual(member.size, 70_000)

    def test_same_seed_same_image(self):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            one = c.write_oci_layout(Path(a), "t", "v1", 3, [5000])
            two = c.write_oci_layout(Path(b), "t", "v1", 3, [5000])
            self.assertEqual(one.digest, two.digest)

    def test_cache_objects_hash_to_their_names(self):
        with tempfile.TemporaryDirectory() as d:
            cache = Path(d)
            (digest, data), total = bench.make_cache(cache, 300)
            files = list((cache / "objects" / "sha256").glob("*/*"))
            self.assertEqual(len(files), 300)
            for p in files:
                self.assertEqual(p.parent.name, p.name[:2])
                self.assertEqual(hashlib.sha256(p.read_bytes()).hexdigest(), p.name)
            self.assertEqual((cache / "objects/sha256" / digest[7:9] / digest[7:]).read_bytes(),
                             data)
            self.assertEqual(total, sum(p.stat().st_size for p in files))


class Report(unittest.TestCase):
    def test_ratios_against_each_column_present(self):
        got = bench.ratios({"dockside": 2.0, "nginx": 4.0, "distribution": 1.0})
        self.assertEqual(got, "d/nginx 0.50, d/dist 2.00")
        got = bench.ratios({"dockside": 1.1, "distribution": 1.6, "direct": 1.0})
        self.assertEqual(got, "d/dist 0.69, d/direct 1.10, dist/direct 1.60")

    def test_missed_target_is_bold(self):
        rows = [dict(what="x", unit="s", target="≤ 1", ok=False, values={"dockside": 2.0})]
        self.assertIn("| ≤ 1 | **no** |", bench.table(rows))

    def test_cluster_table_has_a_column_per_deployment_and_cluster_ratios(self):
        rows = [
            dict(what="wall", unit="s", target="", ok=None,
                 values={"one": 2.0, "independent": 4.0, "cluster": 3.0, "joined": 1.0}),
            dict(what="gets", unit="GETs", target="cluster 1", ok=True,
                 values={"one": 1, "independent": 3, "cluster": 1, "joined": 0}),
        ]
        got = bench.table(rows, bench.CLUSTER_COLUMNS, bench.cluster_ratios).splitlines()
        self.assertEqual(
            got[0],
            "| measure | unit | 1 replica | 3 independent | 3-member cluster "
            "| 4th member joins, warm | ratios | target | met |",
        )
        self.assertEqual(got[1], "|" + "---|" * 9)
        self.assertEqual(
            got[2], "| wall | s | 2.00 | 4.00 | 3.00 | 1.00 "
            "| cluster/1 replica 1.50, cluster/indep 0.75 |  |  |"
        )
        self.assertEqual(
            got[3], "| gets | GETs | 1 | 3 | 1 | 0 "
            "| cluster/1 replica 1.00, cluster/indep 0.33 | cluster 1 | yes |"
        )
        self.assertEqual(bench.cluster_ratios({"one": 0, "cluster": None}), "")


# dockside's /metrics (a member of a 2-member cluster, main 6899a5a), cut down.
METRICS = """# HELP dockside_cluster_fills_total Blob fills started, by role.
# TYPE dockside_cluster_fills_total counter
dockside_cluster_fills_total{role="owned"} 2
dockside_cluster_members{state="down"} 0
dockside_cluster_members{state="up"} 2
dockside_origin_received_bytes_total{kind="upstream",origin="bench.local"} 5000
dockside_origin_received_bytes_total{kind="peer",origin="127.0.0.1:48307"} 700
dockside_origin_received_bytes_total{kind="peer",origin="127.0.0.1:39741"} 1e3
dockside_peer_requests_total{direction="received",mode="held",outcome="ok"} 1
dockside_peer_requests_total{direction="sent",mode="held",outcome="not_found"} 2
dockside_fills_in_flight 0
"""


class Metrics(unittest.TestCase):
    def test_series_as_printed(self):
        m = c.parse_metrics(METRICS)
        self.assertEqual(m['dockside_cluster_members{state="up"}'], 2.0)
        self.assertEqual(m["dockside_fills_in_flight"], 0.0)
        self.assertEqual(len(m), 9)

    def test_sum_over_the_series_with_the_labels_asked(self):
        m = c.parse_metrics(METRICS)
        name = "dockside_origin_received_bytes_total"
        self.assertEqual(c.metric_sum(m, name, kind="peer"), 1700.0)
        self.assertEqual(c.metric_sum(m, name), 6700.0)
        self.assertEqual(c.metric_sum(m, name, kind="upstream", origin="bench.local"), 5000.0)
        self.assertEqual(c.metric_sum(m, "dockside_cluster_fills_total", role="forwarded"), 0.0)
        self.assertEqual(
            c.metric_sum(m, "dockside_peer_requests_total", direction="sent"), 2.0
        )
        # A name is matched whole, not as a prefix.
        self.assertEqual(c.metric_sum(m, "dockside_cluster_fills"), 0.0)


class CurlWriteOut(unittest.TestCase):
    def test_one_line_per_transfer(self):
        # curl 7.88.1, one invocation fetching a blob and then a missing one.
        out = "200 5000 0.015061\n404 228 0.004005\n"
        self.assertEqual(
            c.parse_curl_write_out(out), [(200, 5000, 0.015061), (404, 228, 0.004005)]
        )


class SocketActivation(unittest.TestCase):
    CHILD = """
import json, os, socket
opened = sorted(int(f) for f in os.listdir("/proc/self/fd"))
fds = {}
for fd in (3, 4):
    s = socket.socket(fileno=os.dup(fd))
    fds[fd] = [s.getsockname()[1], s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)]
print(json.dumps(dict(
    pid_ok=os.environ.get("LISTEN_PID") == str(os.getpid()),
    fds=os.environ.get("LISTEN_FDS"), names=os.environ.get("LISTEN_FDNAMES"),
    bench=os.environ.get("BENCH_TEST"), home="HOME" in os.environ,
    open=opened,
    ports={str(k): v for k, v in fds.items()},
)))
"""

    def test_child_gets_the_sockets_on_3_and_4_and_its_own_pid(self):
        with c.Stack() as st:
            reg, admin = c.listener(), c.listener()
            ports = [reg.getsockname()[1], admin.getsockname()[1]]
            env = {k: v for k, v in os.environ.items() if k != "HOME"}
            env["BENCH_TEST"] = "yes"
            log = st.tmp / "child.log"
            # A descriptor open on exec, as one inherited from whoever started the benchmark.
            leak_r, leak_w = os.pipe()
            os.set_inheritable(leak_w, True)
            self.addCleanup(os.close, leak_r)
            self.addCleanup(os.close, leak_w)
            srv = st.spawn(
                "child", [sys.executable, "-c", self.CHILD], ports[0], log, 15, env=env,
                listeners={"registry": reg, "admin": admin},
            )
            srv.proc.wait(30)
            self.assertEqual(srv.proc.returncode, 0, log.read_text())
            got = json.loads(log.read_text())
            # The parent's copies are closed once the child has its own.
            self.assertEqual((reg.fileno(), admin.fileno()), (-1, -1))
        self.assertTrue(got["pid_ok"])
        self.assertEqual((got["fds"], got["names"]), ("2", "registry:admin"))
        self.assertEqual((got["bench"], got["home"]), ("yes", False))
        self.assertEqual(got["ports"], {"3": [ports[0], 1], "4": [ports[1], 1]})
        # stdio, the two sockets and the listing's own descriptor: nothing inherited.
        self.assertEqual(got["open"][:5], [0, 1, 2, 3, 4])
        self.assertEqual(len(got["open"]), 6, got["open"])


class ShapedUpstream(unittest.TestCase):
    def test_names_are_the_runs_own_and_fit_an_interface(self):
        self.assertEqual(
            shaped.names(4194304), ("dockside-bench-4194304", "dsb4304h", "dsb4304n")
        )
        for pid in (1, 99999, 4194304):
            for ifname in shaped.names(pid)[1:]:
                self.assertLessEqual(len(ifname), 15)

    def test_setup_makes_the_pair_with_the_two_test_hosts_and_no_route(self):
        got = shaped.setup_commands("ns", "h", "n")
        self.assertEqual(got, [
            ["ip", "netns", "add", "ns"],
            ["ip", "link", "add", "h", "type", "veth", "peer", "name", "n", "netns", "ns"],
            ["ip", "addr", "add", "10.213.0.1/30", "dev", "h"],
            ["ip", "link", "set", "h", "up"],
            ["ip", "-n", "ns", "addr", "add", "10.213.0.2/30", "dev", "n"],
            ["ip", "-n", "ns", "link", "set", "n", "up"],
            ["ip", "-n", "ns", "link", "set", "lo", "up"],
        ])
        self.assertFalse([argv for argv in got if "route" in argv])

    def test_tbf_on_the_namespaces_end(self):
        self.assertEqual(
            shaped.shape_command("ns", "n", shaped.GBIT),
            ["tc", "-n", "ns", "qdisc", "replace", "dev", "n", "root",
             "tbf", "rate", "1gbit", "burst", "256kb", "latency", "50ms"],
        )
        self.assertEqual(shaped.shape_command("ns", "n", shaped.MBIT100)[10:14],
                         ["100mbit", "burst", "64kb", "latency"])

    def test_teardown_and_exec(self):
        self.assertEqual(shaped.teardown_commands("ns", "h"),
                         [["ip", "netns", "del", "ns"], ["ip", "link", "del", "h"]])
        self.assertEqual(shaped.in_namespace("ns", ["docker-registry", "serve", "c.yml"]),
                         ["ip", "netns", "exec", "ns", "docker-registry", "serve", "c.yml"])

    def test_write_out_after_an_error_message(self):
        # curl 7.88.1 with shaped.WRITE_OUT: a blob, then a refused connection.
        self.assertEqual(shaped.parse_transfer("200 16777216 0.008296 0.151262\n"),
                         (200, 16777216, 0.008296, 0.151262))
        err = ("curl: (7) Failed to connect to 127.0.0.1 port 1 after 0 ms: "
               "Couldn't connect to server\n000 0 0.000000 0.000187\n")
        self.assertEqual(shaped.parse_transfer(err), (0, 0, 0.0, 0.000187))
        with self.assertRaises(RuntimeError):
            shaped.parse_transfer("")

    def test_targets(self):
        self.assertTrue(shaped.wall_ok(1.05, 1.0))
        self.assertFalse(shaped.wall_ok(1.06, 1.0))
        self.assertTrue(shaped.ttfb_ok(9.0, 4.0))
        self.assertFalse(shaped.ttfb_ok(9.1, 4.0))
        self.assertTrue(shaped.ttfb_ok(2.0, 4.0))

    def test_link_share(self):
        # 200 MiB direct at 1 Gbit/s in 1.759 s, as measured: tbf holds the rate.
        self.assertAlmostEqual(shaped.link_share(200 * c.MiB, 1.759, shaped.GBIT), 0.954, 3)

    def test_registry_listens_in_the_namespace_with_its_access_log(self):
        cfg = shaped.registry_config(Path("/tmp/x"))
        self.assertIn("addr: 10.213.0.2:5000\n", cfg)
        self.assertIn("accesslog:\n    disabled: false\n", cfg)
        self.assertIn("rootdirectory: /tmp/x\n", cfg)

    def test_a_server_in_the_namespace_is_reached_at_its_address(self):
        srv = c.Server("up", None, 5000, Path("/nonexistent"), 15)
        up = shaped.InNamespace(srv)
        self.assertEqual((up.url, up.host), ("http://10.213.0.2:5000", "10.213.0.2:5000"))
        self.assertEqual((up.name, up.log_path), ("up", Path("/nonexistent")))

    def test_skipped_with_a_note_when_not_root(self):
        class Bench:
            notes, rows = [], []
        with unittest.mock.patch.object(shaped.os, "geteuid", return_value=1000), \
                unittest.mock.patch.object(shaped, "run") as run:
            shaped.shaped(Bench)
        run.assert_not_called()
        self.assertEqual(Bench.notes, ["shaped upstream part skipped: not root "
                                       "(a network namespace and tc need it)"])
        self.assertEqual(Bench.rows, [])

    def test_sizes(self):
        for sz in (bench.FULL, bench.QUICK):
            self.assertGreater(sz.shaped_gbit_blob, sz.shaped_100mbit_blob)
        self.assertEqual((bench.FULL.shaped_rounds, bench.QUICK.shaped_rounds), (3, 1))
        self.assertLess(bench.QUICK.shaped_gbit_blob, bench.FULL.shaped_gbit_blob)


@unittest.skipUnless(c.DOCKSIDE_BIN.exists(), "needs the release binary (cargo build --release)")
class ClusterConfig(unittest.TestCase):
    def check(self, path):
        return subprocess.run(
            [str(c.DOCKSIDE_BIN), "check-config", "--config", str(path)],
            capture_output=True, text=True,
        )

    def test_each_members_config_is_one_dockside_accepts(self):
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            secret = c.write_secret(d / "cluster-secret")
            self.assertGreaterEqual(len(secret.read_bytes().strip()), 32)
            peers = ["127.0.0.1:5001", "127.0.0.1:5011", "127.0.0.1:5021"]
            base = c.dockside_yaml(5001, 5002, d / "cache", "http://127.0.0.1:5000")
            good, bad = d / "good.yaml", d / "bad.yaml"
            good.write_text(base + c.cluster_yaml(peers[0], peers, secret))
            bad.write_text(base + c.cluster_yaml(peers[0], peers[1:], secret))
            r = self.check(good)
            self.assertEqual(r.returncode, 0, r.stderr)
            # The check is a real one: a member missing from its own list is refused.
            r = self.check(bad)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("cluster.peers", r.stderr)


if __name__ == "__main__":
    unittest.main()
