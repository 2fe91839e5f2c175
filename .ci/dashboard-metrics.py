#!/usr/bin/env python3
"""Fails when the Grafana dashboard queries a metric or label dockside does not export, or
when its panels share an id or overlap.

Usage: dashboard-metrics.py DASHBOARD.json src/metrics.rs [LIVE_METRICS.txt]

Metric names and their labels are read from src/metrics.rs (where every metric is registered)
and, when given, from a scrape of a running dockside's /metrics, so a rename on either side
breaks CI instead of leaving an empty panel.
"""
import json
import re
import sys

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Histogram and summary series share the name of the metric they belong to.
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def declared(metrics_rs):
    """{name: labels} from the counter(...)/gauge(...)/Opts::new(...) calls in metrics.rs."""
    text = open(metrics_rs, encoding="utf-8").read()
    found = {}
    # The labels follow the help text, or the call that wraps name and help (`opts(...)`).
    for m in re.finditer(r'"(dockside_\w+)",\s*"[^"]*"\s*(?:,?\s*\)\s*,|,)\s*(&\[[^\]]*\])?', text):
        found[m.group(1)] = set(re.findall(r'"(\w+)"', m.group(2) or ""))
    return found


def scraped(path):
    """{name: labels} from a Prometheus text exposition."""
    found = {}
    for line in open(path, encoding="utf-8"):
        m = re.match(r"(dockside_\w+)(?:\{([^}]*)\})?\s", line)
        if m:
            labels = set(re.findall(r"(\w+)=", m.group(2) or ""))
            found.setdefault(m.group(1), set()).update(labels)
    return found


def expressions(dashboard):
    """Every PromQL expression in the dashboard's panels and template variables."""
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            yield "variable " + var["name"], query


def base_name(series):
    for suffix in SERIES_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def problems(dashboard, known):
    for where, expr in expressions(dashboard):
        names = {base_name(n) for n in re.findall(r"\bdockside_\w+", expr)}
        if not names:
            yield f"{where}: queries no dockside metric: {expr}"
        for name in sorted(names - known.keys()):
            yield f"{where}: {name} is not exported by dockside"
        for name, selector in re.findall(r"\b(dockside_\w+)\{([^}]*)\}", expr):
            labels = known.get(base_name(name), set()) | TARGET_LABELS
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                if label not in labels:
                    yield f"{where}: {name} has no label {label!r}"
        in_expr = set().union(*(known.get(n, set()) for n in names)) | TARGET_LABELS
        if re.search(r"\bdockside_\w+_bucket\b", expr):
            in_expr.add("le")  # a histogram's buckets
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in re.findall(r"\w+", group):
                if label not in in_expr:
                    yield f"{where}: no metric in the query has label {label!r}"


def layout_problems(dashboard):
    """Panels with a duplicate id, or that overlap on Grafana's 24-column grid."""
    panels = dashboard.get("panels", [])
    ids = [p.get("id") for p in panels]
    for dup in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        yield f"panel id {dup} used more than once"
    placed = []
    for panel in panels:
        g = panel["gridPos"]
        if g["x"] + g["w"] > 24:
            yield f"{panel['title']}: wider than the grid"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        for title, other in placed:
            if cells & other:
                yield f"{panel['title']}: overlaps {title}"
        placed.append((panel["title"], cells))


def main(argv):
    dashboard = json.load(open(argv[1], encoding="utf-8"))
    known = declared(argv[2])
    if len(argv) > 3:
        for name, labels in scraped(argv[3]).items():
            known.setdefault(name, set()).update(labels)
    found = list(problems(dashboard, known)) + list(layout_problems(dashboard))
    for p in found:
        print(f"{argv[1]}: {p}", file=sys.stderr)
    count = sum(1 for _ in expressions(dashboard))
    print(f"{argv[1]}: {count} queries over {len(known)} known metrics, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
