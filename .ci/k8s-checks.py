#!/usr/bin/env python3
"""Consistency checks on rendered Kubernetes manifests that schema validation cannot make.

Usage: k8s-checks.py CLUSTER_WITH_SERVICEMONITOR.yaml NODE_LOCAL.yaml DOCKSIDE_BIN WORKDIR

- Each workload's container ports and cache mount agree with the config in its ConfigMap,
  its probes name ports it has, and its selector matches its pod labels.
- A NetworkPolicy selects each workload's pods and opens the admin port (which carries the
  unauthenticated cache admin API) only to named sources.
- The ServiceMonitor selects a Service that has the port it scrapes.
- The node-local init container's command, run with the real binary, writes one containerd
  hosts file per upstream into the directory the node's certs.d is mounted at.
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


def config_of(docs, pod):
    """The dockside config text in the ConfigMap the pod mounts as `config`."""
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    name = volume["configMap"]["name"]
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


def main(argv):
    errors = []
    monitored, node_local = load(argv[1]), load(argv[2])
    for docs in (monitored, node_local):
        for kind in WORKLOADS:
            for workload in by_kind(docs, kind):
                check_workload(docs, workload, errors.append)
                check_network_policy(docs, workload, errors.append)
    check_service_monitor(monitored, errors.append)
    check_init_container(node_local, argv[3], argv[4], errors.append)
    for e in errors:
        print(f"k8s-checks: {e}", file=sys.stderr)
    print(f"k8s-checks: {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
