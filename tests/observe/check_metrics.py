"""Checks a memdial node's /metrics text (on stdin) with Prometheus's
reference Python parser and against the naming conventions.

Usage: check_metrics.py COMMANDS   (the data commands the test sent,
comma-separated). Prints "all checks passed" or exits non-zero with every
failure listed.
"""

import re
import sys

from prometheus_client.parser import text_string_to_metric_families

text = sys.stdin.read()
sent = set(sys.argv[1].split(",")) if len(sys.argv) > 1 and sys.argv[1] else set()
failures = []

# 1. Every family parses (the parser raises on malformed text).
families = list(text_string_to_metric_families(text))
if not families:
    failures.append("no metric families at all")

# 2. No two families collide: the parser folds a counter `x_total` into the
# family `x`, so a gauge `x` beside it shows up twice.
seen = {}
for f in families:
    if f.name in seen:
        failures.append(f"family {f.name!r} appears twice ({seen[f.name]} and {f.type})")
    seen[f.name] = f.type

# 3. Names as exported (the TYPE lines): prefix, `_total` on counters and
# only on counters, units as suffixes.
declared = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
if len(declared) != len(families):
    failures.append(f"{len(declared)} TYPE lines but {len(families)} families parsed")
for name, kind in declared:
    if not name.startswith("memdial_"):
        failures.append(f"{name}: not prefixed memdial_")
    if kind == "counter" and not name.endswith("_total"):
        failures.append(f"{name}: a counter not ending in _total")
    if kind != "counter" and name.endswith("_total"):
        failures.append(f"{name}: a {kind} ending in _total")
    base = name[: -len("_total")] if name.endswith("_total") else name
    if re.search(r"duration|latency|rtt|delay|time", base) and not base.endswith("_seconds"):
        failures.append(f"{name}: a time without the _seconds unit suffix")
    if "bytes" in base and not base.endswith("_bytes"):
        failures.append(f"{name}: bytes not as the unit suffix")
    if kind == "histogram" and not base.endswith(("_seconds", "_bytes")):
        failures.append(f"{name}: a histogram without a unit suffix")

# 4. Series by command exist only for commands sent, and none is a
# pre-created zero; latency buckets reach 10 s.
for f in families:
    top = 0.0
    for s in f.samples:
        command = s.labels.get("command")
        if command is not None:
            if command not in sent:
                failures.append(f"{s.name}{s.labels}: command {command!r} was never sent")
            if s.name.endswith(("_total", "_count")) and s.value == 0:
                failures.append(f"{s.name}{s.labels}: a pre-created zero series")
        if s.name.endswith("_bucket") and s.labels.get("le") not in (None, "+Inf"):
            top = max(top, float(s.labels["le"]))
    if f.type == "histogram" and top < 10.0:
        failures.append(f"{f.name}: buckets stop at {top} s, below 10 s")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print(f"{len(families)} families; all checks passed")
