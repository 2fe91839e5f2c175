"""Checks of the benchmark's own parsing and content generation, on output captured from the
real tools: `python3 -m unittest discover -s benches/load`."""

import gzip
import hashlib
import io
import json
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import common as c  # noqa: E402

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
            digest, data = bench.make_cache(cache, 300)
            files = list((cache / "objects" / "sha256").glob("*/*"))
            self.assertEqual(len(files), 300)
            for p in files:
                self.assertEqual(p.parent.name, p.name[:2])
                self.assertEqual(hashlib.sha256(p.read_bytes()).hexdigest(), p.name)
            self.assertEqual((cache / "objects/sha256" / digest[7:9] / digest[7:]).read_bytes(),
                             data)


class Report(unittest.TestCase):
    def test_ratios_against_each_column_present(self):
        got = bench.ratios({"dockside": 2.0, "nginx": 4.0, "distribution": 1.0})
        self.assertEqual(got, "d/nginx 0.50, d/dist 2.00")
        got = bench.ratios({"dockside": 1.1, "distribution": 1.6, "direct": 1.0})
        self.assertEqual(got, "d/dist 0.69, d/direct 1.10, dist/direct 1.60")

    def test_missed_target_is_bold(self):
        rows = [dict(what="x", unit="s", target="≤ 1", ok=False, values={"dockside": 2.0})]
        self.assertIn("| ≤ 1 | **no** |", bench.table(rows))


if __name__ == "__main__":
    unittest.main()
