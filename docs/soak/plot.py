"""Plots a soak run (benches/soak.rs): RSS, open fds, replication lag and
write throughput per node over time, with the fault schedule's events as
vertical lines.

    python3 -m pip install matplotlib
    python3 docs/soak/plot.py target/soak docs/soak

reads DIR/samples.csv and DIR/events.csv, writes rss.png, fds.png, lag.png,
backlog.png and writes.png into OUT, and prints a markdown table of RSS, fds and lag per
node.
"""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "MemcachedRestart": "tab:orange",
    "Kill": "tab:red",
    "Start": "tab:green",
    "Pause": "tab:purple",
    "Resume": "tab:pink",
    "Partition": "tab:brown",
    "Heal": "tab:olive",
}


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v):
    return float(v) if v not in ("", None) else None


def events_on(ax, events):
    seen = set()
    for e in events:
        kind = e["event"].split(" ")[0]
        if kind not in COLORS:
            continue
        label = kind if kind not in seen else None
        seen.add(kind)
        ax.axvline(float(e["t_s"]), color=COLORS[kind], lw=0.8, ls="--", alpha=0.7, label=label)


def plot(samples, events, column, ylabel, title, out, scale=1.0, step=False):
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=80)
    for node in ("1", "2", "3"):
        rows = [r for r in samples if r["node"] == node]
        t = [float(r["t_s"]) for r in rows]
        v = [num(r[column]) for r in rows]
        v = [x * scale if x is not None else float("nan") for x in v]
        if step:
            ax.step(t, v, where="post", label=f"node {node}", lw=1.2)
        else:
            ax.plot(t, v, label=f"node {node}", lw=1.2, marker=".", ms=3)
    events_on(ax, events)
    ax.set_xlabel("seconds since the load began")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out}")


def writes_per_second(samples, events):
    """Acknowledged writes per second between consecutive samples (one
    series: the counters are cluster-wide, repeated on each node's row),
    while the load ran."""
    stop = min((float(e["t_s"]) for e in events if e["event"] == "load stops"),
               default=float("inf"))
    rows = [r for r in samples if r["node"] == "1" and float(r["t_s"]) <= stop]
    t, v = [], []
    for a, b in zip(rows, rows[1:]):
        dt = float(b["t_s"]) - float(a["t_s"])
        if dt > 0:
            t.append(float(b["t_s"]))
            v.append((int(b["acked"]) - int(a["acked"])) / dt)
    return t, v


def summary(samples):
    """A markdown table of each node's RSS, fds and lag over the run."""
    print("| node | processes (pids) | RSS first / last / max (MiB) | fds first / last / max "
          "| max lag (entries) |")
    print("|---|---|---|---|---|")
    for node in ("1", "2", "3"):
        rows = [r for r in samples if r["node"] == node and r["rss_kb"]]
        pids = list(dict.fromkeys(r["pid"] for r in rows))
        rss = [int(r["rss_kb"]) / 1024 for r in rows]
        fds = [int(r["fds"]) for r in rows if r["fds"]]
        lags = [int(r["lag_max"]) for r in samples if r["node"] == node and r["lag_max"]]
        print(f"| {node} | {len(pids)} ({', '.join(pids)}) "
              f"| {rss[0]:.1f} / {rss[-1]:.1f} / {max(rss):.1f} "
              f"| {fds[0]} / {fds[-1]} / {max(fds)} | {max(lags) if lags else '-'} |")


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "target/soak")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/soak")
    out.mkdir(parents=True, exist_ok=True)
    samples = read(src / "samples.csv")
    events = read(src / "events.csv")
    plot(samples, events, "rss_kb", "RSS (MiB)", "memdial RSS per node (VmRSS)",
         out / "rss.png", scale=1 / 1024)
    plot(samples, events, "fds", "open fds", "memdial open file descriptors per node",
         out / "fds.png", step=True)
    plot(samples, events, "lag_max", "entries",
         "replication lag: most log entries a peer has not acknowledged (stats cluster)",
         out / "lag.png")
    if "backlog" in samples[0]:
        plot(samples, events, "backlog", "entries",
             "replication backlog per node (backlog_entries; capped at 100,000)",
             out / "backlog.png")
    t, v = writes_per_second(samples, events)
    fig, ax = plt.subplots(figsize=(9, 3.0), dpi=80)
    ax.plot(t, v, color="black", lw=1.2, marker=".", ms=3, label="acknowledged writes/s")
    events_on(ax, events)
    ax.set_xlabel("seconds since the load began")
    ax.set_ylabel("writes/s (all nodes)")
    ax.set_title("acknowledged writes per second, whole cluster")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=5, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "writes.png")
    plt.close(fig)
    print(f"wrote {out / 'writes.png'}")
    summary(samples)


if __name__ == "__main__":
    main()
