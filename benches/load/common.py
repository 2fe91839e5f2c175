"""Shared pieces of the loopback load benchmarks (bench.py, soak.py).

Everything here talks to 127.0.0.1 only. Every process is started in its own session, recorded in
a `Stack`, and stopped by its PID when the stack closes: on success, on an exception and on
Ctrl-C or SIGTERM alike. All state lives in one temp dir that is removed afterwards.
"""

import fcntl
import hashlib
import http.client
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKSIDE_BIN = REPO / "target" / "release" / "dockside"
MiB = 1 << 20
GiB = 1 << 30

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# What docker and containerd send: dockside negotiates on these four, and distribution
# answers a Docker/OCI manifest only to a client that names its type.
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
# The upstream's name in dockside's config; requests name no upstream, so it is the default.
UPSTREAM_NAME = "bench.local"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_main(main):
    """Exit with main's status; Ctrl-C (and SIGTERM, see Stack) exits 130 once all is stopped."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)


def raise_fd_limit(want=65536):
    """Children inherit this: 1000 client sockets plus the server's own need more than 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port():
    """For docker-registry and nginx, which take only an address: bound, then let go."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener():
    """A socket listening on a free loopback port, bound here: dockside is handed it by socket
    activation (`Stack.spawn(listeners=...)`), so its port is known before dockside starts and
    nothing else can take it in between. The backlog is the one dockside asks for itself
    (the kernel caps it at net.core.somaxconn): a herd of clients must not be refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(65535)
    return s


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# processes


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    stop_signal: int
    extra: dict = field(default_factory=dict)

    @property
    def pid(self):
        return self.proc.pid

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def log_text(self, start=0):
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace")

    def log_size(self):
        return self.log_path.stat().st_size


class Stack:
    """A temp dir and the processes started in it; `close` stops them, newest first."""

    def __init__(self, keep=False):
        self.tmp = Path(tempfile.mkdtemp(prefix="dockside-bench-"))
        self.keep = keep
        self.servers = []
        self._seq = 0

    def __enter__(self):
        # SIGTERM takes the same path out as Ctrl-C, so the finally blocks stop everything.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def dir(self, name):
        self._seq += 1
        d = self.tmp / f"{self._seq:02d}-{name}"
        d.mkdir(parents=True)
        return d

    def spawn(self, name, argv, port, log_path, stop_signal, env=None, listeners=None):
        """Starts `argv` in its own session, output to `log_path`. `listeners`, a dict of
        name to listening socket, is passed by socket activation (see `activation_child`);
        this process closes its copies once the child has them."""
        out = open(log_path, "ab")
        child, close_fds = None, True
        if listeners:
            # The sockets go on fds 3, 4, ... and the child's environment is set in the child
            # (LISTEN_PID is its own PID), so it must not close what it inherits.
            child = activation_child(listeners, env)
            env, close_fds = None, False
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=child,
            close_fds=close_fds,
        )
        out.close()
        for sock in (listeners or {}).values():
            sock.close()
        srv = Server(name, proc, port, log_path, stop_signal)
        self.servers.append(srv)
        return srv

    def stop(self, srv, timeout=15):
        """Stops one server by its PID: its own stop signal, then SIGKILL after `timeout`."""
        if srv in self.servers:
            self.servers.remove(srv)
        if srv.proc.poll() is not None:
            return
        try:
            os.kill(srv.pid, srv.stop_signal)
            srv.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"!! {srv.name} (pid {srv.pid}) ignored its stop signal; SIGKILL")
            os.kill(srv.pid, signal.SIGKILL)
            srv.proc.wait()

    def close(self):
        for srv in list(reversed(self.servers)):
            try:
                self.stop(srv)
            except Exception as e:  # keep stopping the others
                log(f"!! stopping {srv.name}: {e}")
        if self.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def activation_child(listeners, env=None):
    """What a child runs between fork and exec to receive `listeners` as systemd's socket
    activation passes them: the sockets on fds 3, 4, ... in order, `LISTEN_FDS` their count,
    `LISTEN_FDNAMES` their names joined by `:`, `LISTEN_PID` the child's own PID. `env`, when
    given, replaces the rest of the environment. Descriptors this process inherited, open on exec,
    are closed, as `close_fds` would (which would close the sockets too); the rest are
    close-on-exec (Python's default), subprocess's error pipe among them."""
    fds = [sock.fileno() for sock in listeners.values()]
    names = ":".join(listeners)

    def child():
        # Copies above the targets first, so that placing one on 3 cannot close another.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
        for target, fd in enumerate(high, start=3):
            os.dup2(fd, target)  # inheritable: it survives exec
            os.close(fd)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if fd >= 3 + len(fds) and os.get_inheritable(fd):
                    os.close(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
        if env is not None:
            for key in set(os.environ) - set(env):
                os.unsetenv(key)
            for key, value in env.items():
                os.putenv(key, value)
        os.putenv("LISTEN_FDS", str(len(fds)))
        os.putenv("LISTEN_FDNAMES", names)
        os.putenv("LISTEN_PID", str(os.getpid()))

    return child


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def wait_until(what, check, srv=None, timeout=30.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv is not None and srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.name} exited while waiting for {what}:\n{tail(srv)}")
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}" + (f":\n{tail(srv)}" if srv else ""))


def tail(srv, lines=25):
    return "\n".join(srv.log_text().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# HTTP


def request(url, method="GET", headers=None, body=None, timeout=30):
    """One request on a fresh connection: (status, headers dict lower-cased, body bytes)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + (f"?{u.query}" if u.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def answers(url, ok=(200,), headers=None):
    try:
        return request(url, headers=headers, timeout=2)[0] in ok
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the servers


def start_registry(st, name, proxy_of=None, storage=None, accesslog=False):
    """Debian's docker-registry: the upstream, or (with `proxy_of`) a pull-through proxy of it."""
    d = st.dir(name)
    storage = storage or d / "storage"
    port = free_port()
    proxy = f"proxy:\n  remoteurl: {proxy_of.url}\n" if proxy_of else ""
    cfg = (
        "version: 0.1\n"
        f"log:\n  level: warn\n  accesslog:\n    disabled: {'false' if accesslog else 'true'}\n"
        f"storage:\n  cache:\n    blobdescriptor: inmemory\n"
        f"  filesystem:\n    rootdirectory: {storage}\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: dockside-bench\n{proxy}"
    )
    (d / "config.yml").write_text(cfg)
    srv = st.spawn(
        name,
        ["docker-registry", "serve", str(d / "config.yml")],
        port,
        d / "registry.log",
        signal.SIGTERM,
    )
    srv.extra["storage"] = storage
    wait_until(f"{name} to answer /v2/", lambda: answers(f"{srv.url}/v2/"), srv)
    return srv


def start_dockside(st, upstream, cache_dir=None, name="dockside", ready_timeout=120,
                   max_size="200GiB"):
    """The release binary with a fresh (or the given) cache dir; per-request logs off (warn)."""
    srv = spawn_dockside(st, upstream, cache_dir=cache_dir, name=name, max_size=max_size)
    wait_dockside(srv, ready_timeout)
    return srv


def spawn_dockside(st, upstream, cache_dir=None, name="dockside", sockets=None, extra_yaml="",
                   cache_yaml="", env_extra=None, max_size="200GiB"):
    """Starts dockside without waiting for it (`wait_dockside`). Its listeners are bound here
    and passed by socket activation; `sockets` = (registry, admin) when the caller bound them
    already (a cluster's members must know each other's ports before any starts).
    `extra_yaml` is appended to the config, `cache_yaml` added under `cache:`, `env_extra` to
    its environment."""
    if not DOCKSIDE_BIN.exists():
        raise RuntimeError(f"{DOCKSIDE_BIN} is missing: run `cargo build --release` first")
    d = st.dir(name)
    cache_dir = cache_dir or d / "cache"
    registry, admin = sockets or (listener(), listener())
    port, admin_port = registry.getsockname()[1], admin.getsockname()[1]
    text = dockside_yaml(port, admin_port, cache_dir, upstream.url, max_size)
    text = text.replace("upstreams:\n", cache_yaml + "upstreams:\n", 1) + extra_yaml
    (d / "dockside.yaml").write_text(text)
    env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_DOCKSIDE_LOG", "warn"), NO_COLOR="1")
    env.update(env_extra or {})
    argv = [str(DOCKSIDE_BIN), "serve", "--config", str(d / "dockside.yaml")]
    srv = st.spawn(
        name, argv, port, d / "dockside.log", signal.SIGINT, env=env,
        listeners={"registry": registry, "admin": admin},
    )
    srv.extra.update(cache=cache_dir, admin=admin_port, started=time.monotonic(), dir=d)
    return srv


def wait_dockside(srv, timeout=120):
    wait_until(f"{srv.name} to answer /v2/", lambda: answers(f"{srv.url}/v2/"), srv, timeout)


def dockside_yaml(port, admin_port, cache_dir, upstream_url, max_size="200GiB"):
    """The config every dockside of the benchmark runs with. The addresses are those of the
    sockets it is passed (`serve` listens on those and reads these only for the log)."""
    return (
        f'listen: "127.0.0.1:{port}"\n'
        f'admin_listen: "127.0.0.1:{admin_port}"\n'
        "grace_period: 1s\n"
        f"cache:\n  dir: {json.dumps(str(cache_dir))}\n  max_size: {max_size}\n  tag_ttl: 1h\n"
        f"upstreams:\n  - name: {UPSTREAM_NAME}\n    url: {upstream_url}\n"
        f"default_upstream: {UPSTREAM_NAME}\n"
    )


def cluster_yaml(me, peers, secret_file, health_interval="1s"):
    """The `cluster:` section of one member: `me` as the others reach it, `peers` all members
    (itself among them), the shared secret's file."""
    return (
        "cluster:\n"
        f"  advertise: {json.dumps(me)}\n"
        f"  peers: {json.dumps(list(peers))}\n"
        f"  secret_file: {json.dumps(str(secret_file))}\n"
        f"  health_interval: {health_interval}\n"
    )


def write_secret(path):
    """A cluster secret: 64 random hex characters (dockside wants at least 32 bytes)."""
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


def start_replicas(st, upstream, n, name, secret_file=None, known=()):
    """`n` docksides on their own ports, admin ports and cache dirs, all spawned before any is
    waited for. With `secret_file` they form a cluster: each lists the `known` members' and the
    new ones' registry addresses (itself included); without, each is a cache of its own."""
    sockets = [(listener(), listener()) for _ in range(n)]
    hosts = [f"127.0.0.1:{reg.getsockname()[1]}" for reg, _ in sockets]
    peers = [*known, *hosts]
    servers = []
    for i, (pair, me) in enumerate(zip(sockets, hosts)):
        extra = cluster_yaml(me, peers, secret_file) if secret_file else ""
        servers.append(
            spawn_dockside(st, upstream, name=f"{name}-{i + 1}", sockets=pair, extra_yaml=extra)
        )
    for srv in servers:
        wait_dockside(srv)
    if secret_file:
        for srv in servers:
            want = len(peers)
            wait_until(
                f"{srv.name} to see {want} cluster members up",
                lambda: metrics(srv).get('dockside_cluster_members{state="up"}') == want,
                srv,
            )
    return servers


# --- the shared tier's S3 server (issue #9) ----------------------------------------------------

# Credentials dockside sends moto (which checks none); no instance metadata lookups.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def moto_venv():
    """The venv the e2e suite installs moto[server] in (`.ci/run` makes it), or None."""
    venv = Path(os.environ.get("DOCKSIDE_E2E_VENV", REPO / "target" / "e2e-venv"))
    return venv if (venv / "bin" / "moto_server").exists() else None


def start_moto(st, venv):
    """moto's server on a port it binds itself (port 0), read back from its log."""
    d = st.dir("moto")
    srv = st.spawn("moto", [str(venv / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", "0"],
                   0, d / "moto.log", signal.SIGINT)

    def port():
        m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", srv.log_text())
        return int(m.group(1)) if m else None

    wait_until("moto to log its port", port, srv)
    srv.port = port()
    wait_until("moto to answer", lambda: answers(f"{srv.url}/moto-api/"), srv)
    return srv


def make_bucket(moto, bucket):
    status, _, body = request(f"{moto.url}/{bucket}", method="PUT")
    if status != 200:
        raise RuntimeError(f"create bucket {bucket}: {status} {body[:200]!r}")


def shared_yaml(endpoint, bucket):
    """The `cache.shared` keys (2-space indent, under `cache:`)."""
    return (
        f"  shared:\n    s3:\n      endpoint: {json.dumps(endpoint)}\n"
        f"      bucket: {bucket}\n      region: us-east-1\n      prefix: cache/\n"
    )


def metrics(srv):
    """A dockside's /metrics as {series as printed: value}."""
    status, _, body = request(f"http://127.0.0.1:{srv.extra['admin']}/metrics")
    if status != 200:
        raise RuntimeError(f"{srv.name}: /metrics answered {status}")
    return parse_metrics(body.decode())


def parse_metrics(text):
    """Prometheus text format to {`name{labels}` as printed: value}; comments skipped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        out[series] = float(value)
    return out


LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(values, name, **labels):
    """The sum of `name`'s series whose labels include `labels` (e.g. kind="peer")."""
    total = 0.0
    for series, value in values.items():
        base, _, rest = series.partition("{")
        if base == name and labels.items() <= dict(LABEL_RE.findall(rest)).items():
            total += value
    return total


def log_warnings(srv, start=0):
    """dockside's WARN and ERROR lines from byte `start` of its log on."""
    lines = srv.log_text(start).splitlines()
    return [line for line in lines if re.search(r"\b(WARN|ERROR)\b", line)]


def start_nginx(st, root):
    """nginx serving `root` as static files with sendfile, as a file server at its best."""
    d = st.dir("nginx")
    port = free_port()
    conf = f"""
user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location ~ /manifests/ {{ default_type {OCI_MANIFEST}; }}
  }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    argv = ["nginx", "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"), "-g", "daemon off;"]
    srv = st.spawn("nginx", argv, port, d / "nginx.log", signal.SIGTERM)
    wait_until("nginx to listen", lambda: answers(f"{srv.url}/", ok=(200, 403, 404)), srv)
    return srv


def proc_status(pid):
    """VmRSS and VmHWM (peak RSS) in bytes, and the open fd count, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


# ---------------------------------------------------------------------------------------------
# content: OCI images and loose blobs, pushed to the upstream


@dataclass
class Image:
    name: str
    tag: str
    manifest: bytes
    blobs: list  # (digest, size)

    @property
    def digest(self):
        return "sha256:" + sha256_hex(self.manifest)

    @property
    def size(self):
        return sum(s for _, s in self.blobs) + len(self.manifest)


def random_bytes(seed, n):
    """Deterministic random bytes; `randbytes` takes at most 256 MiB at once, so in chunks."""
    rng = random.Random(seed)
    chunk = 16 * MiB
    return b"".join(rng.randbytes(min(chunk, n - i)) for i in range(0, n, chunk))


def gzip_stored(data):
    """A gzip stream of `data` in stored (level 0) deflate blocks: fast to make, and random
    bytes would not shrink at any level. Being compressed already, skopeo copies it as it is
    (an uncompressed layer would be gzip'd by skopeo on the way into an oci: layout, and that
    CPU time would swamp what is measured)."""
    z = zlib.compressobj(0, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def _tar_of(name, data):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_oci_layout(layout, name, tag, seed, layer_sizes):
    """An OCI image of gzip'd tar layers of random bytes, as a layout skopeo can push."""
    blobs_dir = layout / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)

    def put(data):
        hexd = sha256_hex(data)
        (blobs_dir / hexd).write_bytes(data)
        return {"digest": f"sha256:{hexd}", "size": len(data)}

    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        tar = _tar_of(f"bench/{name}-{i}.bin", random_bytes(seed * 1000 + i, size))
        diff_ids.append("sha256:" + sha256_hex(tar))
        layer = gzip_stored(tar)
        del tar
        layers.append(dict(mediaType="application/vnd.oci.image.layer.v1.tar+gzip", **put(layer)))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Labels": {"bench.seed": str(seed)}},
    }
    cfg = dict(
        mediaType="application/vnd.oci.image.config.v1+json",
        **put(json.dumps(config).encode()),
    )
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": layers}
    ).encode()
    mdesc = put(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            dict(
                mediaType=OCI_MANIFEST,
                annotations={"org.opencontainers.image.ref.name": tag},
                **mdesc,
            )
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    blobs = [(d["digest"], d["size"]) for d in [cfg, *layers]]
    return Image(f"bench/{name}", tag, manifest, blobs)


def skopeo(args, timeout=600):
    """Runs skopeo; returns its wall time in seconds, raising with its output if it fails."""
    t0 = time.monotonic()
    r = subprocess.run(
        ["skopeo", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return elapsed


def push_image(upstream, layout, img):
    skopeo(
        [
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{layout}:{img.tag}",
            f"docker://{upstream.host}/{img.name}:{img.tag}",
        ]
    )


def push_blob(upstream, repo, data):
    """A loose blob, uploaded with the registry API (monolithic POST then PUT)."""
    digest = "sha256:" + sha256_hex(data)
    status, headers, body = request(f"{upstream.url}/v2/{repo}/blobs/uploads/", "POST", body=b"")
    if status != 202:
        raise RuntimeError(f"upload start: {status} {body[:200]!r}")
    loc = headers["location"]
    loc = loc if loc.startswith("http") else upstream.url + loc
    sep = "&" if "?" in loc else "?"
    hdrs = {"Content-Type": "application/octet-stream"}
    status, _, body = request(f"{loc}{sep}digest={digest}", "PUT", hdrs, data, timeout=300)
    if status != 201:
        raise RuntimeError(f"upload finish: {status} {body[:200]!r}")
    return digest


# ---------------------------------------------------------------------------------------------
# the upstream's access log: exact byte counts of what the mirrors fetched


ACCESS_RE = re.compile(r'\] "(\w+) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def upstream_requests_since(upstream, offset):
    """(method, path, status, bytes) for each request the upstream logged after `offset`.

    A marker request is made and waited for first, so every request answered before the call
    is in the result."""
    marker = f"/v2/?bench-marker={time.monotonic_ns()}"
    request(upstream.url + marker)
    wait_until("the upstream access log", lambda: marker in upstream.log_text(offset), timeout=10)
    out = []
    for m in ACCESS_RE.finditer(upstream.log_text(offset)):
        method, uri, status, size = m.groups()
        if "bench-marker=" not in uri:
            size = 0 if size == "-" else int(size)
            out.append((method, uri.split("?")[0], int(status), size))
    return out


# ---------------------------------------------------------------------------------------------
# load generators


WRK_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def wrk(url, conns, seconds, threads=2, headers=(), script=None, timeout_s=10):
    """Runs wrk and returns requests/s, bytes/s, errors and the latency line it printed."""
    argv = ["wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{seconds}s"]
    argv += [f"--timeout={timeout_s}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    if script:
        argv += ["-s", str(script)]
    r = subprocess.run(
        argv + [url],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed: {r.stdout}\n{r.stderr}")
    return parse_wrk(r.stdout)


def parse_wrk(out):
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    if not m:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    reqs, dur, dunit, size, sunit = m.groups()
    secs = float(dur) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[dunit]
    errors = {"non2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        for k, v in zip(("connect", "read", "write", "timeout"), se.groups()):
            errors[k] = int(v)
    n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n2:
        errors["non2xx"] = int(n2.group(1))
    p99 = re.search(r"99%\s+(\S+)", out)
    return {
        "requests": int(reqs),
        "seconds": secs,
        "rps": int(reqs) / secs,
        "bytes_per_s": float(size) * WRK_UNITS[sunit] / secs,
        "errors": errors,
        "p99": p99.group(1) if p99 else "?",
        "raw": out,
    }


def curl_many(url, n, timeout=900, headers=()):
    """`n` simultaneous curl downloads to /dev/null: (wall seconds, [(status, bytes)]).

    curl rather than Python threads: the client must not be the bottleneck at GiB/s."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    for h in headers:
        argv += ["-H", h]
    procs = []
    t0 = time.monotonic()
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    argv + [url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
                )
            )
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            code, size = out.split()
            results.append((int(code), int(size)))
        return time.monotonic() - t0, results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


CURL_WRITE_OUT = r"%{http_code} %{size_download} %{time_total}\n"


def curl_clients(url_lists, timeout=900, headers=()):
    """One curl per list of URLs, all started at once, each fetching its URLs in order on one
    connection to /dev/null: (wall seconds, per client [(status, bytes, seconds)] per URL)."""
    base = ["curl", "-s", "-w", CURL_WRITE_OUT]
    for h in headers:
        base += ["-H", h]
    procs = []
    t0 = time.monotonic()
    try:
        for urls in url_lists:
            argv = list(base)
            for url in urls:
                argv += ["-o", "/dev/null", url]
            procs.append(
                subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            )
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            results.append(parse_curl_write_out(out))
        return time.monotonic() - t0, results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def parse_curl_write_out(out):
    """`CURL_WRITE_OUT` lines, one per transfer, as [(status, bytes, seconds)]."""
    got = []
    for line in out.splitlines():
        code, size, secs = line.split()
        got.append((int(code), int(size), float(secs)))
    return got
