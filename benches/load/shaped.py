"""The shaped-upstream part of the load benchmark (issue #14): a cold blob through dockside
against the same blob straight from the upstream, with the upstream leg limited to a realistic
link (1 Gbit/s, 100 Mbit/s) and the client leg unlimited.

On loopback every leg is as fast as memory, so a fill that waits on the upstream a little too
long, or a first byte held back, is lost in the noise. A shaped upstream leg is what a mirror
sees in production: the link is the bottleneck, and the target is that dockside costs next to
nothing on top of it (wall time ≤ 1.05× direct, first byte within 5 ms of direct).

The upstream (Debian's docker-registry) runs in a network namespace the benchmark creates and
removes itself, reached over a veth pair whose ends are the benchmark's own test hosts,
10.213.0.1 (this side) and 10.213.0.2 (the namespace's); nothing routes beyond them, and no
default route is added. tbf on the namespace's end shapes its egress: registry to host, the
download direction. Pushes (host to namespace) and the host's ACKs are not shaped, and the
client talks to dockside on loopback. Creating a namespace needs root, `ip` and `tc`: without
them the part is skipped with a note.
"""

import hashlib
import os
import shutil
import signal
import statistics
import subprocess
from dataclasses import dataclass

import common as c
from common import MiB, log

HOST_ADDR = "10.213.0.1"
NS_ADDR = "10.213.0.2"
PREFIX = 30
REGISTRY_PORT = 5000
REPO = "bench/shaped"
# tbf's queue: with 50 ms of it TCP finds the rate without a drop storm; the queue only fills
# in a download, which starts on an empty one, so it adds nothing to a first byte.
LATENCY = "50ms"


@dataclass(frozen=True)
class Shape:
    label: str  # as the table says it
    rate: str  # as tc takes it
    bits: float  # per second, to check what tbf let through
    burst: str  # tbf's bucket


# Bursts measured to hold the rate (Linux 6.18, HZ 250): a 200 MiB download took size / rate
# plus 4.5 % (the frames' headers) with 256 kB as with 1 MB at 1 Gbit/s, and with 32, 64 or
# 128 kB at 100 Mbit/s. A bucket under a GSO frame (64 kB) has tbf split each one; a bigger
# one only lets a longer burst through at line rate.
GBIT = Shape("1 Gbit/s", "1gbit", 1e9, "256kb")
MBIT100 = Shape("100 Mbit/s", "100mbit", 1e8, "64kb")

# Where curl puts its figures: stderr, so stdout is the body alone (hashed on its way in).
WRITE_OUT = "%{stderr}%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n"


# ---------------------------------------------------------------------------------------------
# pure pieces (test_common.py checks them)


def names(pid):
    """The namespace and the veth ends of one run: unique per benchmark process, and short
    enough for an interface name (15 characters at most)."""
    return f"dockside-bench-{pid}", f"dsb{pid % 10000}h", f"dsb{pid % 10000}n"


def setup_commands(ns, host_if, ns_if):
    """The namespace, the veth pair (one end moved into it), the addresses of the two test hosts
    and the links up. The /30 gives each side the route to the other one and nothing more."""
    inside = ["ip", "-n", ns]
    return [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns],
        ["ip", "addr", "add", f"{HOST_ADDR}/{PREFIX}", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        inside + ["addr", "add", f"{NS_ADDR}/{PREFIX}", "dev", ns_if],
        inside + ["link", "set", ns_if, "up"],
        inside + ["link", "set", "lo", "up"],
    ]


def shape_command(ns, ns_if, shape):
    """tbf on the namespace's end of the pair: the registry's egress, the download direction.
    `replace` adds the qdisc the first time and swaps the rate after."""
    return [
        "tc", "-n", ns, "qdisc", "replace", "dev", ns_if, "root",
        "tbf", "rate", shape.rate, "burst", shape.burst, "latency", LATENCY,
    ]


def teardown_commands(ns, host_if):
    """Deleting the namespace takes its end of the pair, and with it the other end, once no
    process is left in it; the host end is deleted by name in case it outlived it."""
    return [["ip", "netns", "del", ns], ["ip", "link", "del", host_if]]


def in_namespace(ns, argv):
    """`ip netns exec` enters the namespace and execs `argv`: the PID is the program's own."""
    return ["ip", "netns", "exec", ns, *argv]


def parse_transfer(text):
    """The last `WRITE_OUT` line of curl's stderr (an error message may come before it):
    (status, bytes, seconds to the first byte, seconds in all)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"no curl write-out in {text!r}")
    code, size, first, total = lines[-1].split()
    return int(code), int(size), float(first), float(total)


def wall_ok(dockside, direct, factor=1.05):
    return dockside <= factor * direct


def ttfb_ok(dockside_ms, direct_ms, slack_ms=5.0):
    return dockside_ms <= direct_ms + slack_ms


def link_share(size, secs, shape):
    """The share of the shaped rate a download of `size` bytes in `secs` used. Headers take
    about 4.4 % of a 1514-byte frame, so tbf holding the rate reads ≈ 0.95; well under means
    something else was the bottleneck, over 1 that the shaping did not hold."""
    return size * 8 / secs / shape.bits


def missing_prerequisites():
    """Why the part cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root (a network namespace and tc need it)"
    missing = [tool for tool in ("ip", "tc", "docker-registry", "curl") if not shutil.which(tool)]
    if missing:
        return f"{', '.join(missing)} missing"
    return None


def registry_config(storage):
    """docker-registry on the namespace's address, with its access log (upstream GETs are
    counted from it, to check each dockside fetch was cold and each warm one stayed home)."""
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
        "storage:\n  cache:\n    blobdescriptor: inmemory\n"
        f"  filesystem:\n    rootdirectory: {storage}\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: {NS_ADDR}:{REGISTRY_PORT}\n  secret: dockside-bench\n"
    )


# ---------------------------------------------------------------------------------------------
# the namespace and the registry in it


def run(argv):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


class Namespace:
    """The namespace and its veth pair, removed on close (also after a failure half-way)."""

    def __init__(self):
        self.ns, self.host_if, self.ns_if = names(os.getpid())
        self.made = set()  # what close deletes: only what this run made, never a namesake's

    def create(self):
        taken = run(["ip", "-o", "addr", "show"])
        if f" {HOST_ADDR}/" in taken:
            raise RuntimeError(f"{HOST_ADDR} is on an interface already (another run, or one "
                               "left behind: see `ip netns list`)")
        for argv in setup_commands(self.ns, self.host_if, self.ns_if):
            run(argv)
            if argv[:3] == ["ip", "netns", "add"]:
                self.made.add("netns")
            elif argv[:3] == ["ip", "link", "add"]:
                self.made.add("link")

    def shape(self, shape):
        run(shape_command(self.ns, self.ns_if, shape))

    def close(self):
        if "netns" in self.made and self.exists():
            # Only what this run started can be in it, and that should be stopped by now.
            for pid in run(["ip", "netns", "pids", self.ns]).split():
                log(f"!! pid {pid} still in {self.ns}; SIGKILL")
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                run(teardown_commands(self.ns, self.host_if)[0])
            except RuntimeError as e:
                log(f"!! {e}")
        if "link" in self.made:
            # The pair goes with the namespace, a moment after `ip netns del` returns; deleted
            # by name if it is still there then.
            try:
                c.wait_until(f"{self.host_if} to go", lambda: not self.host_link_exists(), None, 5)
            except RuntimeError:
                run(teardown_commands(self.ns, self.host_if)[1])
        self.made.clear()

    def exists(self):
        return self.ns in run(["ip", "netns", "list"]).split()

    def host_link_exists(self):
        r = subprocess.run(["ip", "link", "show", self.host_if], capture_output=True)
        return r.returncode == 0


class InNamespace:
    """A server started in the namespace: its `c.Server` (PID, log) reached at the namespace's
    address, so `c.push_blob`, `c.upstream_requests_since` and dockside's config take it as
    they take one on loopback."""

    def __init__(self, srv):
        self.srv = srv

    def __getattr__(self, name):
        return getattr(self.srv, name)

    @property
    def url(self):
        return f"http://{NS_ADDR}:{REGISTRY_PORT}"

    @property
    def host(self):
        return f"{NS_ADDR}:{REGISTRY_PORT}"


def spawn_registry(st, netns):
    """Started, not waited for (`wait_registry`): the caller has its PID to stop even if it
    never answers."""
    d = st.dir("shaped-upstream")
    (d / "config.yml").write_text(registry_config(d / "storage"))
    argv = in_namespace(netns.ns, ["docker-registry", "serve", str(d / "config.yml")])
    srv = st.spawn("shaped-upstream", argv, REGISTRY_PORT, d / "registry.log", signal.SIGTERM)
    return InNamespace(srv)


def wait_registry(up):
    c.wait_until("the shaped upstream to answer /v2/", lambda: c.answers(f"{up.url}/v2/"), up.srv)
    # Stopped by this PID: it must be the registry's, not an `ip` that would outlive it.
    exe = os.path.basename(os.readlink(f"/proc/{up.pid}/exe"))
    if exe != "docker-registry":
        raise RuntimeError(f"pid {up.pid} in the namespace is {exe}, not docker-registry")


# ---------------------------------------------------------------------------------------------
# the measurement


def fetch(url, size, hexd, timeout=600):
    """One curl download, its body hashed as it arrives: (seconds to the first byte, seconds
    in all). Raises unless it is a 200 of `size` bytes that hash to `hexd`."""
    argv = ["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", WRITE_OUT, url]
    h, got = hashlib.sha256(), 0
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as p:
        while chunk := p.stdout.read1(1 << 20):
            h.update(chunk)
            got += len(chunk)
        err = p.stderr.read().decode("utf-8", "replace")
        p.wait()
    status, curl_size, first, total = parse_transfer(err)
    if (status, curl_size, got) != (200, size, size) or h.hexdigest() != hexd:
        raise RuntimeError(f"{url}: {status}, {got} bytes (curl: {curl_size}), "
                           f"sha256 {'ok' if h.hexdigest() == hexd else 'wrong'}: {err.strip()}")
    return first, total


def blob_gets(asked, digest):
    return sum(1 for r in asked if r[0] == "GET" and r[1].endswith(digest))


def cold_pair(b, up, d, shape, seed, size, direct_first):
    """A new random blob pushed to the upstream, fetched direct and cold through `d` (its
    first fetch of it), in the order asked: {"direct": (first, total), "cold": ...}, and the
    blob's path. The upstream must have been asked for it once by each."""
    blob = c.random_bytes(seed, size)
    hexd = c.sha256_hex(blob)
    digest = c.push_blob(up, REPO, blob)
    del blob
    path = f"/v2/{REPO}/blobs/{digest}"
    order = [("direct", up), ("cold", d)]
    if not direct_first:
        order.reverse()
    off = up.log_size()
    got = {key: fetch(srv.url + path, size, hexd) for key, srv in order}
    gets = blob_gets(c.upstream_requests_since(up, off), digest)
    if gets != 2:
        b.notes.append(f"shaped {shape.label}: {gets} upstream GETs of a blob fetched once "
                       "direct and once cold through dockside (want 2)")
    return got, path, hexd


def one_shape(b, up, netns, shape, size, rounds, probes):
    """`rounds` rounds, each with a new random blob of `size` and a dockside with an empty
    cache: the blob direct and cold through dockside, the two in turns (which goes first
    alternates), then warm through the same dockside. Then `probes` more new blobs of 1 MiB,
    direct and cold in turns, for the first byte only: a few milliseconds of the registry's
    own jitter would swamp a median of 3. Rows of the medians."""
    netns.shape(shape)
    runs = {"direct": [], "cold": [], "warm": []}
    firsts = {"direct": [], "cold": []}
    for i in range(rounds):
        d = c.start_dockside(b.st, up, name="dockside-shaped")
        got, path, hexd = cold_pair(b, up, d, shape, f"shaped {shape.rate} {i}", size, i % 2 == 0)
        off = up.log_size()
        got["warm"] = fetch(d.url + path, size, hexd)
        if blob_gets(c.upstream_requests_since(up, off), path.rpartition("/")[2]):
            b.notes.append(f"shaped {shape.label}: a warm fetch through dockside asked upstream")
        for key, v in got.items():
            runs[key].append(v)
        log("   " + ", ".join(f"{k} {v[1]:.2f}s (first byte {v[0] * 1e3:.1f} ms)"
                              for k, v in got.items()))
        stop_dockside(b, d, shape)
    d = c.start_dockside(b.st, up, name="dockside-shaped-probes")
    for j in range(probes):
        got, _, _ = cold_pair(b, up, d, shape, f"shaped {shape.rate} probe {j}", MiB, j % 2 == 0)
        for key, (first, _) in got.items():
            firsts[key].append(first)
    stop_dockside(b, d, shape)
    for key in firsts:
        firsts[key] += [first for first, _ in runs[key]]
    walls = {k: statistics.median(total for _, total in v) for k, v in runs.items()}
    ms = {k: statistics.median(v) * 1e3 for k, v in firsts.items()}
    share = link_share(size, walls["direct"], shape)
    log(f"   {shape.label}: direct used {share:.0%} of the link; first byte over "
        f"{len(firsts['cold'])} cold fetches, ms: direct "
        + " ".join(f"{f * 1e3:.1f}" for f in firsts["direct"])
        + "; dockside " + " ".join(f"{f * 1e3:.1f}" for f in firsts["cold"]))
    if not 0.85 <= share <= 1.0:
        b.notes.append(f"shaped {shape.label}: the direct download used {share:.0%} of the "
                       "link (≈ 95 % when tbf is the bottleneck and holds the rate)")
    what = f"{size // MiB} MiB blob, {shape.label} upstream"
    b.row(f"cold {what}, wall time", "s", "≤ 1.05× direct",
          wall_ok(walls["cold"], walls["direct"]), dockside=walls["cold"], direct=walls["direct"])
    b.row(f"cold blob, {shape.label} upstream, time to first byte (median of "
          f"{len(firsts['cold'])}; dockside {ms['cold'] - ms['direct']:+.1f} ms)", "ms",
          "within 5 ms of direct", ttfb_ok(ms["cold"], ms["direct"]),
          dockside=ms["cold"], direct=ms["direct"])
    b.row(f"warm {what}, wall time (from dockside's disk)", "s",
          dockside=walls["warm"], direct=walls["direct"])


def stop_dockside(b, d, shape):
    warned = c.log_warnings(d)
    if warned:
        b.notes.append(f"shaped {shape.label}: {d.name} logged {len(warned)} WARN/ERROR "
                       f"lines, the first: `{warned[0].strip()}`")
    b.st.stop(d)
    shutil.rmtree(d.extra["dir"], ignore_errors=True)  # its cache: up to a blob per round


def shaped(b):
    """The part, run from bench.py's `Bench.shaped`: each shape in turn on one namespace and one
    upstream in it. The registry and every dockside are stopped by their PIDs before the
    namespace is deleted (a namespace with a process left in it would outlive `ip netns del`,
    and its veth with it)."""
    why = missing_prerequisites()
    if why:
        b.notes.append(f"shaped upstream part skipped: {why}")
        return
    netns = Namespace()
    before = list(b.st.servers)
    try:
        try:
            netns.create()
        except RuntimeError as e:
            b.notes.append(f"shaped upstream part skipped: cannot make its namespace: {e}")
            return
        up = spawn_registry(b.st, netns)
        wait_registry(up)
        sz = b.sz
        for shape, size in ((GBIT, sz.shaped_gbit_blob), (MBIT100, sz.shaped_100mbit_blob)):
            log(f"   {shape.label}: {sz.shaped_rounds} rounds of {size // MiB} MiB, "
                f"{sz.shaped_ttfb_probes} first-byte probes")
            one_shape(b, up, netns, shape, size, sz.shaped_rounds, sz.shaped_ttfb_probes)
    finally:
        # Everything this part started, newest first, before the namespace goes: a dockside
        # left running after a failure would otherwise reach for 10.213.0.2 with no veth to
        # carry it, and the default route would.
        try:
            for srv in [srv for srv in reversed(b.st.servers) if srv not in before]:
                try:
                    b.st.stop(srv)
                except Exception as e:  # keep stopping the others
                    log(f"!! stopping {srv.name}: {e}")
        finally:
            netns.close()
