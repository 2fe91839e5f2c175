#!/usr/bin/env python3
"""Consistency checks on rendered Kubernetes manifests that schema validation cannot make.

Usage: k8s-checks.py CLUSTER_WITH_SERVICEMONITOR.yaml NODE_LOCAL.yaml NODE_LOCAL_CLUSTER.yaml
                     DOCKSIDE_BIN WORKDIR

- Each workload's container ports and cache mount agree with the config in its ConfigMap,
  its probes name ports it has, and its selector matches its pod labels.
- A NetworkPolicy selects each workload's pods and opens the admin port (which carries the
  unauthenticated cache admin API) only to named sources.
- The ServiceMonitor selects a Service that has the port it scrapes.
- The node-local init container's command, run with the real binary, writes one containerd
  hosts file per upstream into the directory the node's certs.d is mounted at.
- A StatefulSet whose config has a `cluster:` section: advertise is the pod IP from the downward
  API at the registry port; peers_dns names a headless Service of ready pods only that selects
  the pods at that port; secret_file is a Secret key mounted at that path; a NetworkPolicy lets
  the pods reach each other's registry port.
- node-local-cluster: some upstream's URL is the cluster's client Service, and only for the
  cluster's default upstream (a dockside origin is sent bare repository paths, which the
  cluster takes for its default upstream).
"""
import pathlib
import subprocess
import sys

import yaml

WORKLOADS = ("DaemonSet", "StatefulSet")


def load(path):
    return [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def volume_sources(volume):
    """A volume's ConfigMap and Secret sources, as ("configMap" | "secret", source) pairs."""
    if "projected" in volume:
        for source in volume["projected"]["sources"]:
            for kind in ("configMap", "secret"):
                if kind in source:
                    yield kind, source[kind]
    for kind in ("configMap", "secret"):
        if kind in volume:
            yield kind, volume[kind]


def config_of(docs, pod):
    """The dockside config text in the ConfigMap the pod mounts as `config`."""
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    name = next(s["name"] for kind, s in volume_sources(volume) if kind == "configMap")
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == name)
    return cm["data"]["dockside.yaml"]


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def check_workload(docs, workload, fail):
    where = f"{workload['kind']}/{workload['metadata']['name']}"
    spec = workload["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    for key, value in spec["selector"]["matchLabels"].items():
        if labels.get(key) != value:
            fail(f"{where}: selector {key}={value} does not match the pod labels {labels}")
    config = yaml.safe_load(config_of(docs, pod))
    main = next(c for c in pod["containers"] if c["name"] == "dockside")
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    if ports.get("registry") != port_of(config["listen"]):
        fail(f"{where}: port registry {ports.get('registry')} but config listens on {config['listen']}")
    if ports.get("admin") != port_of(config["admin_listen"]):
        fail(f"{where}: port admin {ports.get('admin')} but admin_listen is {config['admin_listen']}")
    for probe in ("readinessProbe", "livenessProbe"):
        port = main[probe]["httpGet"]["port"]
        if port not in ports:
            fail(f"{where}: {probe} names port {port!r}, which the container does not have")
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    if mounts.get("cache") != config["cache"]["dir"]:
        fail(f"{where}: cache mounted at {mounts.get('cache')} but cache.dir is {config['cache']['dir']}")


def check_network_policy(docs, workload, fail):
    """A policy selects the pods, and opens the admin port only to named sources."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    policies = [
        p for p in by_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    if not policies:
        fail(f"{workload['kind']}/{workload['metadata']['name']}: no NetworkPolicy selects its pods")
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if (not ports or "admin" in ports) and not rule.get("from"):
                fail(f"NetworkPolicy/{policy['metadata']['name']}: admin port open to everyone")


def check_service_monitor(docs, fail):
    for sm in by_kind(docs, "ServiceMonitor"):
        wanted = sm["spec"]["selector"]["matchLabels"]
        services = [
            s for s in by_kind(docs, "Service")
            if s["metadata"].get("namespace") == sm["metadata"].get("namespace")
            and wanted.items() <= s["metadata"].get("labels", {}).items()
        ]
        if not services:
            fail(f"ServiceMonitor/{sm['metadata']['name']}: selects no Service ({wanted})")
        for endpoint in sm["spec"]["endpoints"]:
            for s in services:
                if endpoint["port"] not in {p["name"] for p in s["spec"]["ports"]}:
                    fail(f"Service/{s['metadata']['name']} has no port {endpoint['port']!r} to scrape")


def check_init_container(docs, binary, work, fail):
    ds = by_kind(docs, "DaemonSet")[0]
    pod = ds["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "containerd-hosts")
    config = config_of(docs, pod)
    etc = pathlib.Path(work) / "init-etc-dockside"
    host = pathlib.Path(work) / "init-host"
    etc.mkdir()
    (etc / "dockside.yaml").write_text(config)
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    certs_mount = mounts["containerd-certs"]
    args = [
        a.replace("$(NODE_IP)", "10.1.2.3")
        .replace(mounts["config"], str(etc))
        .replace(certs_mount.rsplit("/certs.d", 1)[0], str(host))
        for a in init["args"]
    ]
    subprocess.run([binary, *args], check=True, capture_output=True)
    for upstream in yaml.safe_load(config)["upstreams"]:
        hosts = host / "certs.d" / upstream["name"] / "hosts.toml"
        if not hosts.is_file() or 'host."http://10.1.2.3:5000"' not in hosts.read_text():
            fail(f"init container: {hosts} missing or not aimed at the node's dockside")


def selects(selector, labels):
    return bool(selector) and selector.items() <= labels.items()


def check_cluster(docs, workload, fail):
    """The `cluster:` section of a StatefulSet's config agrees with the manifests around it."""
    pod = workload["spec"]["template"]["spec"]
    cluster = yaml.safe_load(config_of(docs, pod)).get("cluster")
    where = f"StatefulSet/{workload['metadata']['name']}"
    if cluster is None:
        fail(f"{where}: its config has no cluster: section")
        return
    labels = workload["spec"]["template"]["metadata"]["labels"]
    namespace = workload["metadata"].get("namespace")
    main = next(c for c in pod["containers"] if c["name"] == "dockside")
    registry = next(p["containerPort"] for p in main["ports"] if p["name"] == "registry")

    advertise = cluster.get("advertise", "")
    if advertise != f"${{POD_IP}}:{registry}":
        fail(f"{where}: cluster.advertise is {advertise!r}, not the pod IP at the registry port")
    env = {e["name"]: e for e in main.get("env", [])}
    field = env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if field != "status.podIP":
        fail(f"{where}: env POD_IP is not status.podIP from the downward API")

    host, port = cluster.get("peers_dns", ":0").rsplit(":", 1)
    name, _, rest = host.partition(".")
    service = next(
        (s for s in by_kind(docs, "Service") if s["metadata"]["name"] == name
         and s["metadata"].get("namespace") == namespace),
        None,
    )
    if service is None or not rest.startswith(f"{namespace}.svc"):
        fail(f"{where}: cluster.peers_dns {host!r} is no Service in namespace {namespace}")
    else:
        spec = service["spec"]
        if spec.get("clusterIP") != "None":
            fail(f"Service/{name}: not headless, so its name has no record per member")
        if spec.get("publishNotReadyAddresses"):
            fail(f"Service/{name}: publishes pods that are not ready as members")
        if not selects(spec.get("selector"), labels):
            fail(f"Service/{name}: does not select the pods of {where}")
        targets = [p.get("targetPort") for p in spec["ports"] if p["port"] == int(port)]
        if not targets or targets[0] not in ("registry", registry):
            fail(f"Service/{name}: port {port} does not lead to the registry port")

    secret_file = pathlib.PurePosixPath(cluster.get("secret_file", "/"))
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volume_name = mounts.get(str(secret_file.parent))
    volume = next((v for v in pod["volumes"] if v["name"] == volume_name), {})
    secrets = {s["name"]: s for kind, s in volume_sources(volume) if kind == "secret"}
    found = False
    for secret_name, source in secrets.items():
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        key = items.get(secret_file.name, secret_file.name if not items else None)
        secret = next(
            (s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == secret_name), None
        )
        if secret is not None and key in secret.get("data", {}):
            found = True
    if not found:
        fail(f"{where}: cluster.secret_file {secret_file} is no Secret key mounted at that path")

    def lets_peers_in(rule):
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and not ports & {"registry", registry}:
            return False
        sources = rule.get("from")
        return not sources or any(
            selects(s.get("podSelector", {}).get("matchLabels", {}), labels)
            and "namespaceSelector" not in s
            for s in sources
        )

    policies = [
        p for p in by_kind(docs, "NetworkPolicy")
        if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]
    if not any(lets_peers_in(r) for p in policies for r in p["spec"].get("ingress", [])):
        fail(f"{where}: no NetworkPolicy lets the pods reach each other's registry port")


def check_cluster_origin(node_local, cluster, fail):
    """node-local-cluster's upstreams that are the cluster's client Service are its default."""
    ds = by_kind(node_local, "DaemonSet")[0]
    upstreams = yaml.safe_load(config_of(node_local, ds["spec"]["template"]["spec"]))["upstreams"]
    sts = by_kind(cluster, "StatefulSet")[0]
    cluster_config = yaml.safe_load(config_of(cluster, sts["spec"]["template"]["spec"]))
    named = [u["name"] for u in cluster_config["upstreams"]]
    default = cluster_config.get("default_upstream") or (
        "docker.io" if "docker.io" in named else named[0]
    )
    services = {
        f"http://{s['metadata']['name']}.{s['metadata']['namespace']}.svc:{p['port']}"
        for s in by_kind(cluster, "Service") if s["spec"].get("clusterIP") != "None"
        for p in s["spec"]["ports"]
    }
    through = []
    for upstream in upstreams:
        for url in upstream.get("urls", [upstream.get("url")]):
            if url.rstrip("/") in services:
                through.append(upstream["name"])
                if upstream["name"] != default:
                    fail(f"node-local-cluster: upstream {upstream['name']} goes through {url}, "
                         f"which takes every request for its default upstream {default}")
    if not through:
        fail(f"node-local-cluster: no upstream's URL is one of the cluster's Services {services}")


def main(argv):
    errors = []
    monitored, node_local, node_local_cluster = load(argv[1]), load(argv[2]), load(argv[3])
    binary, work = argv[4], pathlib.Path(argv[5])
    for docs in (monitored, node_local, node_local_cluster):
        for kind in WORKLOADS:
            for workload in by_kind(docs, kind):
                check_workload(docs, workload, errors.append)
                check_network_policy(docs, workload, errors.append)
    for workload in by_kind(monitored, "StatefulSet"):
        check_cluster(monitored, workload, errors.append)
    check_service_monitor(monitored, errors.append)
    for name, docs in (("node-local", node_local), ("node-local-cluster", node_local_cluster)):
        (work / name).mkdir()
        check_init_container(docs, binary, work / name, errors.append)
    check_cluster_origin(node_local_cluster, monitored, errors.append)
    for e in errors:
        print(f"k8s-checks: {e}", file=sys.stderr)
    print(f"k8s-checks: {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
