#!/usr/bin/env python3
"""Summarise bench/run.sh's results.tsv: medians per tool and scenario, ratios to the anchor, targets.

The ratio is ours ÷ anchor on median wall time; "paired" is the median of the per-repetition ratios
(each repetition runs both back to back, so it cancels slow drifts of a shared machine).
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
from collections import OrderedDict

TARGETS = {  # scenario prefix -> (target ratio or RSS, text)
    "1": (1.0, "≤ 1.0 × tar | age"),
    "2": (0.3, "≤ 0.3 × restic"),
    "3": (1.3, "≤ 1.3 × pg_dumpall"),
    "4": (1.0, "≤ 1.0 × age -d | tar -x"),
    "5": (128.0, "peak RSS ≤ 128 MiB"),
    "6": (1.0, "≤ 1.0 × age -d"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tsv")
    ap.add_argument("--scale", default="?")
    ap.add_argument("--reps", default="?")
    a = ap.parse_args()
    rows = OrderedDict()
    for line in open(a.tsv):
        scen, tool, role, wall, cpu, rss = line.rstrip("\n").split("\t")
        rows.setdefault(scen, OrderedDict()).setdefault((tool, role), []).append(
            (float(wall), float(cpu), int(rss) / 1024))
    cpu = os.cpu_count()
    model = ""
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                model = l.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = open("/proc/loadavg").read().split()[0]
    except OSError:
        load = "?"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    print(f"### {datetime.date.today().isoformat()} — {cpu} cores ({model}), scale {a.scale}, "
          f"{a.reps} repetitions, commit {rev or '?'}, load average at the end {load}\n")
    print("| scenario | tool | wall (median) | CPU | peak RSS | ratio | paired | target | |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for scen, tools in rows.items():
        key = scen.split()[0]
        target, ttext = TARGETS.get(key, (None, ""))
        ttext = ttext.replace("|", "\\|")
        anchor = next((v for (t, r), v in tools.items() if r == "anchor"), None)
        for (tool, role), v in tools.items():
            w = statistics.median(x[0] for x in v)
            c = statistics.median(x[1] for x in v)
            m = max(x[2] for x in v)
            ratio = paired = ""
            verdict = ""
            if anchor and role != "anchor":
                aw = statistics.median(x[0] for x in anchor)
                ratio = f"{w / aw:.2f}×"
                pr = [o[0] / an[0] for o, an in zip(v, anchor)]
                paired = f"{statistics.median(pr):.2f}×"
                if role == "ours" and key != "5" and target is not None:
                    verdict = "✅" if w / aw <= target else "❌"
            if role == "ours" and key == "5":
                verdict = "✅" if m <= target else "❌"
            tool = tool.replace("|", "\\|")
            name = f"**{tool}**" if role == "ours" else tool + (" (anchor)" if role == "anchor" else "")
            print(f"| {scen} | {name} | {w:.2f} s | {c:.2f} s | {m:.0f} MiB | {ratio} | {paired} | "
                  f"{ttext if role == 'ours' else ''} | {verdict} |")
    print()


if __name__ == "__main__":
    main()
