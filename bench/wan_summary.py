#!/usr/bin/env python3
"""Summary of a bench/wan.sh run: one Markdown table per scenario from WORK/wan.tsv and the link
proxy's counts (WORK/runs/NAME.json), with the issue-17 targets: wall against bytes on the wire ÷
link rate, ours ÷ anchor, the request budget of a no-change backup, the uplink use of one big file.
Also compares our own request counts (`backup --json`'s `requests`) with the proxy's.

    wan_summary.py WORK --up 50 --down 200
"""
import argparse
import json
import os
from collections import defaultdict

KINDS = [("PUT", ["PUT"]), ("part", ["PART"]), ("mpu", ["MPU_CREATE", "MPU_COMPLETE", "MPU_ABORT"]),
         ("GET", ["GET"]), ("HEAD", ["HEAD"]), ("LIST", ["LIST"]),
         ("DEL", ["DELETE", "BULK_DELETE"]), ("other", ["OTHER"])]


def load(work):
    rows = []
    for line in open(os.path.join(work, "wan.tsv")):
        scen, rtt, tool, name, wall, cpu, rss = line.rstrip("\n").split("\t")
        s = json.load(open(os.path.join(work, "runs", name + ".json")))
        ours = None
        try:
            out = json.load(open(os.path.join(work, "runs", name + ".out")))
            ours = out.get("requests")
        except (ValueError, OSError):
            pass
        rows.append(dict(scen=scen, rtt=int(float(rtt)), tool=tool, name=name, wall=float(wall),
                         cpu=float(cpu), rss=int(rss), link=s, ours=ours))
    return rows


def reqs(s):
    r = s["requests"]
    return " ".join(f"{k} {sum(r.get(x, 0) for x in xs)}" for k, xs in KINDS
                    if sum(r.get(x, 0) for x in xs))


def verdict(ok):
    return "✅" if ok else "❌ miss"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--up", type=float, default=50)
    ap.add_argument("--down", type=float, default=200)
    a = ap.parse_args()
    rows = load(a.work)
    up, down = a.up * 1e6 / 8, a.down * 1e6 / 8
    by = defaultdict(list)
    for r in rows:
        by[(r["scen"], r["rtt"])].append(r)
    print(f"Link: {a.up:g} Mbit/s up, {a.down:g} Mbit/s down; RTT per table. MB = 10^6 bytes on the wire "
          "(HTTP headers included). Requests as the link proxy counted them.\n")
    print("| scenario | RTT | tool | wall | bytes up | bytes down | requests | peak RSS | target | |")
    print("|---|---:|---|---:|---:|---:|---|---:|---|---|")
    for (scen, rtt), rs in by.items():
        anchors = [r for r in rs if not r["tool"].startswith("immich-backup")]
        for r in rs:
            s = r["link"]
            target, ok = "", None
            mine = r["tool"].startswith("immich-backup")
            if mine:
                if scen.startswith("1"):
                    ideal = s["bytes_up"] / up
                    parts = [f"{r['wall'] / ideal:.2f}× bytes÷uplink (≤ 1.1)"]
                    ok = r["wall"] <= 1.1 * ideal
                    for t in anchors:
                        lim = 0.8 if t["tool"].startswith("rclone") else 0.5
                        q = r["wall"] / t["wall"]
                        parts.append(f"{q:.2f}× {t['tool'].split()[0]} (≤ {lim})")
                        ok = ok and q <= lim
                    target = "; ".join(parts)
                elif scen.startswith("3"):
                    ideal = s["bytes_down"] / down
                    parts = [f"{r['wall'] / ideal:.2f}× bytes÷downlink (≤ 1.1)"]
                    ok = r["wall"] <= 1.1 * ideal
                    for t in anchors:
                        lim = 0.8 if t["tool"].startswith("rclone") else 0.5
                        q = r["wall"] / t["wall"]
                        parts.append(f"{q:.2f}× {t['tool'].split()[0]} (≤ {lim})")
                        ok = ok and q <= lim
                    target = "; ".join(parts)
                elif scen.startswith("2"):
                    n = s["requests_total"]
                    target = f"{r['wall']:.2f} s (≤ 2 s), {n} requests (≤ 20 + listing)"
                    ok = r["wall"] <= 2 and n <= 21
                    for t in anchors:
                        target += f"; {r['wall'] / t['wall']:.2f}× restic"
                elif scen.startswith("4") and "drop" not in scen:
                    use = s["bytes_up"] / r["wall"] / up
                    target = f"{use * 100:.0f} % of uplink (≥ 90 %), RSS ≤ 128 MiB"
                    ok = use >= 0.9 and r["rss"] <= 128 * 1024
            elif scen.startswith("0"):
                rate = (s["bytes_down"] / down if "down" in r["tool"] else s["bytes_up"] / up)
                target = f"{rate / r['wall'] * 100:.0f} % of the configured rate"
            print(f"| {scen} | {rtt} ms | {'**' + r['tool'] + '**' if mine else r['tool']} | "
                  f"{r['wall']:.1f} s | {s['bytes_up'] / 1e6:.1f} MB | {s['bytes_down'] / 1e6:.1f} MB | "
                  f"{reqs(s)} | {r['rss'] / 1024:.0f} MiB | {target} | {'' if ok is None else verdict(ok)} |")
    clean = [r for r in rows if r["scen"] == "4 big file"]
    for d in (r for r in rows if "drop" in r["scen"]):
        if not clean:
            break
        c, dl, cl = clean[0], d["link"], clean[0]["link"]
        print(f"\n{d['scen']}: {json.dumps(dl['drops'])}; wall {d['wall']:.1f} s against "
              f"{c['wall']:.1f} s undisturbed ({d['wall'] - c['wall']:+.1f} s); bytes up "
              f"{dl['bytes_up'] / 1e6:.1f} MB against {cl['bytes_up'] / 1e6:.1f} MB "
              f"({(dl['bytes_up'] - cl['bytes_up']) / 1e6:+.1f} MB); parts "
              f"{dl['requests'].get('PART', 0)} against {cl['requests'].get('PART', 0)}; "
              f"part bytes {dl['request_body_bytes'].get('PART', 0) / 1e6:.1f} MB against "
              f"{cl['request_body_bytes'].get('PART', 0) / 1e6:.1f} MB; statuses {dl['statuses']}")
    print("\nOur own counts (`backup --json` requests) against the proxy's:\n")
    for r in rows:
        if r["ours"]:
            o, p = r["ours"], r["link"]["requests"]
            print(f"- {r['name']}: ours put {o['put']} part {o['part']} multipart {o['multipart']} "
                  f"get {o['get']} head {o['head']} list {o['list']} delete {o['delete']}; proxy {reqs(r['link'])}")


if __name__ == "__main__":
    main()
