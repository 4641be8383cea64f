#!/usr/bin/env python3
"""Draws the load harness's raw results as SVG plots.

Usage:
    python3 benches/plot.py [RESULTS] [--out DIR] [--value N] [--conns N] [--pipeline N]
                            [--format svg|png]

    RESULTS        JSON lines written by `cargo bench --bench load -- --out FILE`
                   [docs/plots/results.jsonl]
    --out DIR      where the plots go [docs/plots]
    --value N      value size in bytes of the rows drawn [32]
    --conns N      connections of the throughput-vs-depth plot, the CPU plot
                   and the latency curve [50]
    --pipeline N   depth of the throughput-vs-connections plot and the
                   latency curve [1]
    --format F     svg or png [svg]

Writes, into DIR (the names below with the --format's suffix):
    throughput-vs-pipeline.svg   ops/s against pipeline depth at --conns
                                 connections, one line per target
    throughput-vs-conns.svg      ops/s against connection count at depth
                                 --pipeline, one line per target
    latency-percentiles.svg      latency against percentile at depth
                                 --pipeline and --conns connections; x is
                                 1/(1-p) on a log scale, so 90, 99, 99.9 and
                                 99.99 are evenly spaced
    cpu-vs-pipeline.svg          requests answered per CPU-second of the
                                 process serving the target (a proxy's own
                                 CPU, not its memcached's) against depth

Each line of RESULTS is one target at one value size, connection count and
depth (the fields are listed at `Out` in benches/load.rs). Where a file holds
the same target and point more than once (two runs appended to one file), the
last line wins. Lines marked `failed` are left out and named on stderr.
Reads only RESULTS; needs matplotlib (the Agg backend, no display) and
nothing from the network. The SVGs carry no date and fixed ids, so the same
results give the same files.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "memdial"
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

# Thousands on the ops/s axes: "250k", not an offset of 1e6.
KILO = FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0")

# Targets in the order load.rs measures them, with a fixed look each.
STYLE = {
    "memcached direct": dict(color="black", linestyle="--", marker="o"),
    "twemproxy -> memcached": dict(color="tab:gray", linestyle="--", marker="s"),
    "memdial -> memcached": dict(color="tab:blue", marker="^"),
    "memdial embedded": dict(color="tab:cyan", marker="v"),
    "memdial eventual x3, node 1": dict(color="tab:green", marker="D"),
    "memdial sequential x3, node 1": dict(color="tab:orange", marker="P"),
    "memdial linearizable x3, node 1": dict(color="tab:red", marker="X"),
}


def load(path):
    """The rows of `path`, the last of each (target, value, conns, depth)."""
    rows = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("failed"):
            print(f"{path}:{n}: {r['target']} at {r['conns']} conns, depth "
                  f"{r['pipeline']} is marked failed; left out", file=sys.stderr)
            continue
        rows[(r["target"], r["value"], r["conns"], r["pipeline"])] = r
    return list(rows.values())


def ordered(targets):
    known = [t for t in STYLE if t in targets]
    return known + sorted(t for t in targets if t not in STYLE)


def caption(rows):
    """What the rows were measured with, for the plot's subtitle."""
    runs = sorted({r["run"] for r in rows})
    commits = sorted({r["commit"] for r in rows})
    generators = sorted({r["generator"].split(" sha=")[0] for r in rows})
    r = rows[0]
    return (f"{', '.join(generators)}; 1 set : {r['gets_per_set']} gets, "
            f"{r['keys']} keys, {r['value']}-byte values, {r['seconds']} s per point\n"
            f"run {', '.join(runs)} (UTC), commit {', '.join(commits)}")


def lines(ax, rows, x, y):
    """One line per target through (x(row), y(row)), x ascending."""
    for target in ordered({r["target"] for r in rows}):
        points = sorted((x(r), y(r)) for r in rows
                        if r["target"] == target and y(r) is not None)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=target, **STYLE.get(target, {}))


def axis_at(ax, values):
    """A log x axis ticked exactly at `values`."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(v) for v in values])


def save(fig, ax, o, name, title, rows):
    ax.set_title(f"{title}\n{caption(rows)}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(o.out) / f"{name}.{o.format}"
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    print(f"wrote {path}")


def per_depth(rows, o, name, ylabel, y, title):
    rows = [r for r in rows if r["conns"] == o.conns]
    if not rows:
        print(f"{name}: no rows at {o.conns} connections; skipped", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    lines(ax, rows, lambda r: r["pipeline"], y)
    axis_at(ax, sorted({r["pipeline"] for r in rows}))
    ax.set_xlabel("pipeline depth (requests per batch on each connection)")
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(KILO)
    ax.set_ylim(bottom=0)
    save(fig, ax, o, name, title, rows)


def per_conns(rows, o):
    name = "throughput-vs-conns"
    rows = [r for r in rows if r["pipeline"] == o.pipeline]
    if len({r["conns"] for r in rows}) < 2:
        print(f"{name}: fewer than two connection counts at depth {o.pipeline}; skipped",
              file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    lines(ax, rows, lambda r: r["conns"], lambda r: r["ops_per_sec"])
    axis_at(ax, sorted({r["conns"] for r in rows}))
    ax.set_xlabel("client connections")
    ax.set_ylabel("ops/s")
    ax.yaxis.set_major_formatter(KILO)
    ax.set_ylim(bottom=0)
    save(fig, ax, o, name, f"Throughput against connections, pipeline depth {o.pipeline}", rows)


def percentiles(rows, o):
    name = "latency-percentiles"
    rows = [r for r in rows if r["conns"] == o.conns and r["pipeline"] == o.pipeline]
    if not rows:
        print(f"{name}: no rows at {o.conns} connections, depth {o.pipeline}; skipped",
              file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    shown = set()
    for target in ordered({r["target"] for r in rows}):
        r = next(r for r in rows if r["target"] == target)
        points = [(p, us) for p, us in r["percentiles_us"] if p < 100]
        if not points:
            continue
        shown.update(p for p, _ in points)
        ax.plot([1 / (1 - p / 100) for p, _ in points], [us for _, us in points],
                label=target, **STYLE.get(target, {}))
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Below the median the ticks would crowd each other: points only.
    ticks = sorted(p for p in shown if p >= 50)
    ax.xaxis.set_major_locator(FixedLocator([1 / (1 - p / 100) for p in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{p:g}" for p in ticks], fontsize=8)
    ax.set_xlabel("percentile (x = 1/(1-p), log scale)")
    ax.set_ylabel("latency per request, µs (log scale)")
    save(fig, ax, o, name,
         f"Latency percentiles, pipeline depth {o.pipeline}, {o.conns} connections", rows)


def main():
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("results", nargs="?", default="docs/plots/results.jsonl")
    a.add_argument("--out", default="docs/plots")
    a.add_argument("--value", type=int, default=32)
    a.add_argument("--conns", type=int, default=50)
    a.add_argument("--pipeline", type=int, default=1)
    a.add_argument("--format", choices=["svg", "png"], default="svg")
    o = a.parse_args()
    rows = [r for r in load(o.results) if r["value"] == o.value]
    if not rows:
        sys.exit(f"{o.results}: no usable rows with {o.value}-byte values")
    Path(o.out).mkdir(parents=True, exist_ok=True)
    per_depth(rows, o, "throughput-vs-pipeline", "ops/s",
              lambda r: r["ops_per_sec"],
              f"Throughput against pipeline depth, {o.conns} connections")
    per_conns(rows, o)
    percentiles(rows, o)
    per_depth(rows, o, "cpu-vs-pipeline",
              "requests per CPU-second of the serving process",
              lambda r: r["ops_per_cpu_s"],
              f"CPU efficiency against pipeline depth, {o.conns} connections")


if __name__ == "__main__":
    main()
