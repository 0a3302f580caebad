#!/usr/bin/env python3
"""Writes docs/benchmarks.md and its plots from a scripts/bench run.

    report.py --dir /tmp/tidepool-bench --out docs [--elapsed SECS] [--setup SECS] [--command CMD]

Reads DIR/results.jsonl (one object per measured run), DIR/env.json,
DIR/commands.txt, the pgbench per-transaction logs (DIR/raw/latlog-*) and the
generated pooler configs. Every figure is the median over rounds; ranges are
min-max over rounds. Nothing is asserted.
"""

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

# tidepool: --threads 1 (one event loop, PgBouncer's model); tidepool_mt:
# tidepool's default runtime, a worker per core.
TARGETS = ["direct", "pgbouncer", "tidepool", "tidepool_mt"]
POOLERS = ["pgbouncer", "tidepool", "tidepool_mt"]
TIDEPOOLS = ["tidepool", "tidepool_mt"]
MODES = ["simple", "extended", "prepared"]
COLORS = {"direct": "#7f7f7f", "pgbouncer": "#1f77b4", "tidepool": "#2ca02c", "tidepool_mt": "#98df8a"}
LABELS = {"direct": "direct", "pgbouncer": "PgBouncer", "tidepool": "tidepool, 1 thread",
          "tidepool_mt": "tidepool, all cores"}


def offset(i, n, width):
    """x offset of the i-th of n bars in a group."""
    return (i - (n - 1) / 2) * width


def load(args):
    results = []
    with open(os.path.join(args.dir, "results.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                results.append(json.loads(line))
    with open(os.path.join(args.dir, "env.json")) as f:
        env = json.load(f)
    return results, env


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rng(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


def fnum(x, digits=0):
    if x is None:
        return "n/a"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}×"


def percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    i = max(1, min(len(sorted_xs), int(-(-p / 100.0 * len(sorted_xs) // 1))))
    return sorted_xs[i - 1]


# --- per-scenario aggregation -------------------------------------------------


def pgbench_runs(results, scenario, mode, target):
    return [r for r in results if r.get("scenario") == scenario and r.get("mode") == mode
            and r.get("target") == target and "skipped" not in r]


def skipped(results, scenario, mode, target):
    for r in results:
        if (r.get("scenario") == scenario and r.get("mode") == mode and r.get("target") == target
                and "skipped" in r):
            return r["skipped"]
    return None


def pgbench_stats(runs):
    """Median tps, pooler CPU us/txn, machine CPU us/txn, failures over rounds."""
    if not runs:
        return None
    tps = [r["tps"] for r in runs]
    pooler = []
    machine = []
    for r in runs:
        tck = r["clk_tck"]
        if r["txns"] > 0:
            machine.append(r["machine_busy_ticks"] / tck * 1e6 / r["txns"])
            if r.get("pooler_cpu_ticks") is not None:
                pooler.append(r["pooler_cpu_ticks"] / tck * 1e6 / r["txns"])
    pooler_util = [r["pooler_cpu_ticks"] / r["clk_tck"] / r["wall_secs"] for r in runs
                   if r.get("pooler_cpu_ticks") is not None and r["wall_secs"] > 0]
    split = [r for r in runs if r.get("pooler_cpu_ticks") is not None and r["txns"] > 0
             and r.get("pooler_user_ticks") is not None]
    user = [r["pooler_user_ticks"] / r["clk_tck"] * 1e6 / r["txns"] for r in split]
    system = [r["pooler_sys_ticks"] / r["clk_tck"] * 1e6 / r["txns"] for r in split]
    vol = [r["pooler_voluntary_switches"] / r["txns"] for r in split]
    invol = [r["pooler_involuntary_switches"] / r["txns"] for r in split]
    return {
        "tps": med(tps), "tps_range": rng(tps),
        "pooler_us": med(pooler), "pooler_range": rng(pooler),
        "machine_us": med(machine),
        "pooler_cores": med(pooler_util),
        "user_us": med(user), "sys_us": med(system),
        "vol_per_txn": med(vol), "invol_per_txn": med(invol),
        "failed": sum(r["failed"] for r in runs),
        "bad_status": sum(1 for r in runs if r["status"] != 0),
        "txns": sum(r["txns"] for r in runs),
        "rounds": len(runs),
        "rss_kb": med([r.get("pooler_rss_kb") for r in runs]),
    }


def paired_ratio(results, scenario, mode, target="tidepool"):
    """tidepool / PgBouncer per round (the two ran back to back in that
    round, so they shared its background noise): median and range."""
    def per_txn(r):
        if r.get("pooler_cpu_ticks") is None or r["txns"] <= 0:
            return None
        return r["pooler_cpu_ticks"] / r["clk_tck"] * 1e6 / r["txns"]
    by_round = {}
    for t in ("pgbouncer", target):
        for r in pgbench_runs(results, scenario, mode, t):
            by_round.setdefault(r["round"], {})[t] = per_txn(r)
    xs = [v[target] / v["pgbouncer"] for v in by_round.values()
          if v.get(target) is not None and v.get("pgbouncer")]
    if not xs:
        return None
    lo, hi = rng(xs)
    return {"median": med(xs), "lo": lo, "hi": hi, "n": len(xs),
            "below": sum(1 for x in xs if x < 1)}


def micro_stats(results):
    return [r for r in results if r.get("scenario") == "classifier_micro"]


def per_txn_instructions(rs):
    """Instructions per transaction from callgrind runs of two lengths: the
    difference between the shortest and the longest over the difference in
    transactions (start-up and shutdown cancel out); None without two."""
    rs = sorted((r for r in rs if isinstance(r.get("instructions"), (int, float))),
                key=lambda r: r["txns_per_client"])
    if len(rs) < 2:
        return None
    a, b = rs[0], rs[-1]
    txns = (b["txns_per_client"] - a["txns_per_client"]) * b["clients"]
    return (b["instructions"] - a["instructions"]) / txns if txns > 0 else None


def instruction_table(results, scenario, field, keys):
    """Instructions per transaction of `scenario`'s callgrind runs, per
    (record[field] in keys, mode)."""
    out = {}
    for k in keys:
        for m in ("simple", "extended"):
            per = per_txn_instructions(r for r in results if r.get("scenario") == scenario
                                       and r.get(field) == k and r["mode"] == m)
            if per is not None:
                out[(k, m)] = per
    return out


def instruction_stats(results):
    """User-space instructions per transaction from the callgrind runs, per
    (target, mode)."""
    return instruction_table(results, "instructions", "target", POOLERS)


def routing_instruction_stats(results):
    """Scenario 7b: instructions per transaction of the routing tidepool, per
    (variant, mode), as in `instruction_stats`."""
    return instruction_table(results, "routing_instructions", "variant", ("primary_only", "classify_only"))


def steal_percent(d):
    """Share of all CPU time the hypervisor took (steal) during the run."""
    try:
        a = [int(x) for x in open(os.path.join(d, "stat-start")).read().split()[1:]]
        b = [int(x) for x in open(os.path.join(d, "stat-end")).read().split()[1:]]
    except (OSError, ValueError):
        return None
    delta = [y - x for x, y in zip(a, b)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal
    if total <= 0 or len(delta) < 8:
        return None
    return round(100 * delta[7] / total, 1)


def callgrind_top(results, target, mode, n=15):
    """The functions that take the most of `target`'s instructions per
    transaction (self cost, difference of the two callgrind runs)."""
    rs = [r for r in results if r.get("scenario") == "instructions" and r["target"] == target
          and r["mode"] == mode and isinstance(r.get("instructions"), (int, float))]
    if len(rs) < 2 or not shutil.which("callgrind_annotate"):
        return []
    rs.sort(key=lambda r: r["txns_per_client"])
    a, b = rs[0], rs[-1]
    txns = (b["txns_per_client"] - a["txns_per_client"]) * b["clients"]

    def load(path):
        try:
            text = subprocess.run(["callgrind_annotate", "--auto=no", "--inclusive=no", "--threshold=100", path],
                                  capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        costs = {}
        for line in text.splitlines():
            m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(\S.*)", line)
            if not m or "PROGRAM TOTALS" in line:
                continue
            name = re.sub(r" \[.*\]$", "", m.group(2))
            name = name.split(":", 1)[1] if ":" in name else name
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
        return costs

    lo, hi = load(a["raw"]), load(b["raw"])
    if txns <= 0 or not hi:
        return []
    per = {k: (v - lo.get(k, 0)) / txns for k, v in hi.items()}
    return sorted(per.items(), key=lambda kv: -kv[1])[:n]


def split_cell(s):
    if s.get("user_us") is None or s.get("pooler_us") is None:
        return "—"
    return f"{fnum(s['user_us'], 1)} / {fnum(s['sys_us'], 1)}"


def switch_cell(s):
    if s.get("vol_per_txn") is None or s.get("pooler_us") is None:
        return "—"
    return f"{s['vol_per_txn']:.2f} / {s['invol_per_txn']:.2f}"


def latlog(args, target, rnd):
    """Per-transaction latencies (µs) of one round's pgbench -l logs."""
    lat = []
    for path in glob.glob(os.path.join(args.dir, "raw", f"latlog-{target}-r{rnd}.*")):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    lat.append(int(parts[2]))
    return lat


def latency_stats(args, results, target):
    runs = pgbench_runs(results, "latency1", "simple", target)
    lat = [x for r in runs for x in latlog(args, target, r["round"])]
    if not lat:
        return None
    lat.sort()
    return {
        "n": len(lat),
        "mean": sum(lat) / len(lat),
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "p999": percentile(lat, 99.9),
        "max": lat[-1],
        "tps": med([r["tps"] for r in runs]),
        "pooler_us": (pgbench_stats(runs) or {}).get("pooler_us"),
    }


def latency_rounds(args, results):
    """Per round and target: mean, p50 and p99 of that round's transactions,
    and the pooler's figure minus direct's in the same round."""
    out = {}
    for t in TARGETS:
        for r in pgbench_runs(results, "latency1", "simple", t):
            lat = latlog(args, t, r["round"])
            if lat:
                lat.sort()
                out.setdefault(r["round"], {})[t] = {
                    "mean": sum(lat) / len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99)}
    added = {}
    for t in POOLERS:
        for k in ("mean", "p50", "p99"):
            xs = [v[t][k] - v["direct"][k] for v in out.values() if t in v and "direct" in v]
            added[(t, k)] = (med(xs), rng(xs))
    return out, added


def idle_stats(results, target):
    runs = [r for r in results if r.get("scenario") == "idle" and r.get("target") == target]
    if not runs:
        return None
    per = [(r["after_kb"] - r["before_kb"]) / r["clients"] for r in runs]
    lg = [r.get("loadgen") or {} for r in runs]
    return {
        "clients": runs[0]["clients"],
        "metric": runs[0]["metric"],
        "per_client_kib": med(per), "range": rng(per),
        "before_kb": med([r["before_kb"] for r in runs]),
        "after_kb": med([r["after_kb"] for r in runs]),
        "after_close_kb": med([r["after_close_kb"] for r in runs]),
        "connected": min((x.get("connected", 0) for x in lg), default=0),
        "errors": sum(x.get("errors", 0) for x in lg),
        "error_kinds": [k for x in lg for k in x.get("error_kinds", [])],
        "connect_secs": med([x.get("connect_secs") for x in lg]),
        "rounds": len(runs),
    }


def many_stats(results, env, target):
    runs = [r for r in results if r.get("scenario") == "many" and r.get("target") == target]
    if not runs:
        return None
    lg = [r.get("loadgen") or {} for r in runs]
    ok = [x for x in lg if x]
    tck = env["clk_tck"]
    cpu = [x["watch_cpu_ticks"] / tck * 1e6 / x["queries_in_time"] for x in ok
           if x.get("watch_cpu_ticks") is not None and x.get("queries_in_time")]
    return {
        "clients": runs[0]["clients"],
        "rounds": len(runs),
        "failed_runs": sum(1 for r in runs if not r.get("loadgen")),
        "connected_min": min((x.get("connected", 0) for x in ok), default=0),
        "errors": sum(x.get("errors", 0) for x in ok),
        "error_kinds": [k for x in ok for k in x.get("error_kinds", [])],
        "qps": med([x.get("qps") for x in ok]), "qps_range": rng([x.get("qps") for x in ok]),
        "p50": med([x.get("lat_p50_us") for x in ok]),
        "p99": med([x.get("lat_p99_us") for x in ok]),
        "p999": med([x.get("lat_p999_us") for x in ok]),
        "max": max((x.get("lat_max_us", 0) for x in ok), default=None),
        "mean": med([x.get("lat_mean_us") for x in ok]),
        "per_client_min": min((x.get("per_client_min", 0) for x in ok), default=None),
        "per_client_median": med([x.get("per_client_median") for x in ok]),
        "connect_secs": med([x.get("connect_secs") for x in ok]),
        "pooler_us": med(cpu),
    }


def db_cpu(results):
    """Scenario 6b: the CPU cap each PostgreSQL server had (fraction of a core)."""
    caps = [r["db_cpu"] for r in results if r.get("scenario") == "routing" and r.get("db_cpu") is not None]
    return f"{caps[0]:g}" if caps else "?"


def routing_stats(results, variant, mode):
    """Scenarios 6-7: one variant of the routing tidepool, medians over rounds."""
    runs = [r for r in results if r.get("scenario") == "routing" and r.get("variant") == variant
            and r.get("mode") == mode]
    if not runs:
        return None
    pooler, server, shares = [], [], []
    for r in runs:
        tck = r["clk_tck"]
        srv = r["primary_ticks"] + r["replica1_ticks"] + r["replica2_ticks"]
        if r["txns"] > 0:
            pooler.append(r["pooler_cpu_ticks"] / tck * 1e6 / r["txns"])
            server.append(srv / tck * 1e6 / r["txns"])
        if srv > 0:
            shares.append([r["primary_ticks"] / srv, r["replica1_ticks"] / srv, r["replica2_ticks"] / srv])
    tps = [r["tps"] for r in runs]
    return {
        "tps": med(tps), "tps_range": rng(tps),
        "pooler_us": med(pooler), "pooler_range": rng(pooler),
        "server_us": med(server),
        "shares": [med([x[i] for x in shares]) for i in range(3)] if shares else None,
        "failed": sum(r["failed"] for r in runs),
        "bad_status": sum(1 for r in runs if r["status"] != 0),
        "rounds": len(runs),
    }


# --- plots ----------------------------------------------------------------------


def note_missing(ax, groups, S, targets, width):
    """Writes "not run" where a target has no bar (e.g. PgBouncer < 1.21, -M prepared)."""
    for g, (scen, mode, _) in enumerate(groups):
        for i, t in enumerate(targets):
            if not S.get((scen, mode, t)):
                ax.text(g + offset(i, len(targets), width), ax.get_ylim()[1] * 0.02, f"{LABELS[t]}: not run",
                        rotation=90, ha="center", va="bottom", fontsize=8, color=COLORS[t])


def plots(out, S, lat, many):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots this run."

    files = []
    # Throughput
    groups = [("select50", m, f"-M {m}\n50 clients") for m in MODES] + [("select500", "simple", "-M simple\n500 clients")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [4, 1.3]})
    width = 0.2
    for i, t in enumerate(TARGETS):
        xs, ys, lo, hi = [], [], [], []
        for g, (scen, mode, _) in enumerate(groups):
            s = S.get((scen, mode, t))
            if s and s["tps"] is not None:
                xs.append(g + offset(i, len(TARGETS), width))
                ys.append(s["tps"])
                lo.append(s["tps"] - s["tps_range"][0])
                hi.append(s["tps_range"][1] - s["tps"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=LABELS[t], color=COLORS[t])
    note_missing(ax, groups, S, TARGETS, width)
    ax.set_xticks(range(len(groups)), [g[2] for g in groups])
    ax.set_ylabel("transactions / s (pgbench -S)")
    ax.set_title("Throughput, pool of 20 (bars: median, whiskers: min-max)")
    ax.legend()
    for i, t in enumerate(POOLERS):
        m = many.get(t)
        if m and m["qps"] is not None:
            lo_, hi_ = m["qps_range"]
            ax2.bar(i, m["qps"], 0.6, yerr=[[m["qps"] - lo_], [hi_ - m["qps"]]], capsize=2, color=COLORS[t])
    ax2.set_xticks(range(len(POOLERS)), [LABELS[t].replace(", ", "\n") for t in POOLERS])
    ax2.set_title("10,000 clients, select 1")
    ax2.set_ylabel("queries / s")
    fig.tight_layout()
    path = os.path.join(out, "benchmarks-throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    # CPU per transaction
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, t in enumerate(POOLERS):
        xs, ys = [], []
        for g, (scen, mode, _) in enumerate(groups):
            s = S.get((scen, mode, t))
            if s and s["pooler_us"] is not None:
                xs.append(g + offset(i, len(POOLERS), 0.26))
                ys.append(s["pooler_us"])
        ax.bar(xs, ys, 0.26, label=LABELS[t], color=COLORS[t])
    note_missing(ax, groups, S, POOLERS, 0.26)
    ax.set_xticks(range(len(groups)), [g[2] for g in groups])
    ax.set_ylabel("pooler CPU µs / transaction")
    ax.set_title("Pooler process CPU per transaction (utime+stime)")
    ax.legend()
    for i, t in enumerate(TARGETS):
        xs, ys = [], []
        for g, (scen, mode, _) in enumerate(groups):
            s = S.get((scen, mode, t))
            if s and s["machine_us"] is not None:
                xs.append(g + offset(i, len(TARGETS), width))
                ys.append(s["machine_us"])
        ax2.bar(xs, ys, width, label=LABELS[t], color=COLORS[t])
    note_missing(ax2, groups, S, TARGETS, width)
    ax2.set_xticks(range(len(groups)), [g[2] for g in groups])
    ax2.set_ylabel("machine CPU µs / transaction")
    ax2.set_title("Whole machine (PostgreSQL + pgbench + pooler)")
    ax2.legend()
    fig.tight_layout()
    path = os.path.join(out, "benchmarks-cpu.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    # Latency, 1 client
    stats = ["mean", "p50", "p90", "p99", "p999"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, t in enumerate(TARGETS):
        L = lat.get(t)
        if not L:
            continue
        ax.bar([k + offset(i, len(TARGETS), width) for k in range(len(stats))], [L[s] for s in stats], width,
               label=LABELS[t], color=COLORS[t])
    ax.set_xticks(range(len(stats)), ["mean", "p50", "p90", "p99", "p99.9"])
    ax.set_ylabel("latency µs")
    ax.set_title("Latency, 1 client, pgbench -S -M simple")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "benchmarks-latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files, None


# --- report -----------------------------------------------------------------------


def micro_table(w, results):
    micro = micro_stats(results)
    if not micro:
        return
    w("In-process micro-benchmark, `tidepool classify --bench` (the release binary; each figure the "
      "median of 7 batches of 40 ms): what classifying one statement costs when it is **parsed** "
      "(no cache knows the text: PostgreSQL's grammar through `pg_query`, then a walk of the tree), "
      "found in the shared **text cache** (the same text seen before: hash, shard lock, lookup), "
      "or matched by the client's **template memo** (the same statement sent lately, with any "
      "literals: a byte comparison). A `pgbench -S -M simple` client pays the memo's cost.")
    w("")
    w("| statement | class | parsed ns | text cache ns | template memo ns | parsed / memo |")
    w("|---|---|---:|---:|---:|---:|")
    for x in micro:
        sql = x["statement"] if len(x["statement"]) <= 70 else x["statement"][:67] + "…"
        w(f"| `{sql}` | {x['class']} | {fnum(x['parsed_ns'])} | {fnum(x['text_cache_ns'])} | "
          f"{fnum(x['template_memo_ns'])} | {ratio(x['parsed_ns'], x['template_memo_ns'], 0)} |")
    w("")
    w("In the proxy (pooler CPU per transaction with and without routing):")
    w("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--setup", type=int, default=0)
    ap.add_argument("--command", default="./scripts/bench")
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    args = ap.parse_args()
    results, env = load(args)
    env["steal_percent"] = steal_percent(args.dir)
    os.makedirs(args.out, exist_ok=True)

    S = {}
    for scen, modes in (("select50", MODES), ("select500", ["simple"])):
        for mode in modes:
            for t in TARGETS:
                S[(scen, mode, t)] = pgbench_stats(pgbench_runs(results, scen, mode, t))
    lat = {t: latency_stats(args, results, t) for t in TARGETS}
    lat_rounds, lat_added = latency_rounds(args, results)
    idle = {t: idle_stats(results, t) for t in TARGETS}
    many = {t: many_stats(results, env, t) for t in POOLERS}
    stubs = {r["scenario"]: r["skipped"] for r in results
             if r.get("scenario") in ("read_scaling", "classifier", "read_scaling_capped")}
    R = {(v, m): routing_stats(results, v, m) for v in ("primary_only", "replicas", "classify_only",
                                                          "primary_only_capped", "replicas_capped")
         for m in ("simple", "extended")}
    I = instruction_stats(results)

    files, plot_note = plots(args.out, S, lat, many)
    rel = {os.path.basename(f): os.path.basename(f) for f in files}

    L = []
    w = L.append
    w("# Benchmarks: tidepool, PgBouncer and direct PostgreSQL")
    w("")
    w(f"_Generated by `{args.command}` on {env['date']} — do not edit by hand; run the script again._")
    if env["quick"]:
        w("")
        w(f"**Quick run** ({env['rounds']} round × {env['duration']} s per scenario): a smoke test, "
          "not numbers to quote.")
    w("")
    w("Everything runs on one machine over loopback: PostgreSQL, the poolers, pgbench and the "
      "load generator share its CPUs. Each scenario runs direct PostgreSQL, PgBouncer and tidepool "
      "(one thread, and all cores) one after another in every round (the order rotates each round) so that background noise "
      "is shared. Figures are medians over rounds; ranges are min–max. Nothing is asserted.")
    w("")

    # Summary
    w("## Summary")
    w("")
    w("| measure | direct | PgBouncer | tidepool, 1 thread | tidepool, all cores | 1 thread / PgBouncer | "
      "all cores / PgBouncer | 1 thread / direct |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")

    def row(label, d, p, t, m, digits=0, direct=None, ratio_d=None):
        """One summary row: the four figures (None: not run), tidepool's
        ratios to PgBouncer and (1 thread) to direct."""
        dcell = direct if direct is not None else ("—" if d is None else fnum(d, digits))
        rd = ratio_d if ratio_d is not None else ("—" if d is None else ratio(t, d))
        pcell = "—" if p is None else fnum(p, digits)
        w(f"| {label} | {dcell} | {pcell} | {fnum(t, digits)} | {fnum(m, digits)} | "
          f"{ratio(t, p) if p is not None else '—'} | {ratio(m, p) if p is not None else '—'} | {rd} |")

    def fig(stats, key):
        return stats and stats.get(key)

    for mode in MODES:
        p, t, m = (S[("select50", mode, x)] for x in POOLERS)
        row(f"pooler CPU µs/txn, -M {mode}, 50 clients", None, fig(p, "pooler_us") if p else None,
            fig(t, "pooler_us"), fig(m, "pooler_us"), 1, direct="—")
    for mode in MODES:
        prs = [paired_ratio(results, "select50", mode, x) for x in TIDEPOOLS]
        if any(prs):
            cells = [f"{pr['median']:.2f}× ({pr['lo']:.2f}–{pr['hi']:.2f}×), lower in {pr['below']} of {pr['n']}"
                     if pr else "n/a" for pr in prs]
            w(f"| pooler CPU / PgBouncer's in the same round (paired), -M {mode}: median (range) | — | — | "
              f"— | — | {cells[0]} | {cells[1]} | — |")
    for mode in ("simple", "extended"):
        p, t = I.get(("pgbouncer", mode)), I.get(("tidepool", mode))
        if p or t:
            row(f"pooler user-space instructions/txn, -M {mode} (callgrind, one thread)", None, p, t, None,
                direct="—")
    for mode in MODES:
        d, p, t, m = (S[("select50", mode, x)] for x in TARGETS)
        row(f"machine CPU µs/txn, -M {mode}, 50 clients", fig(d, "machine_us"), fig(p, "machine_us") if p else None,
            fig(t, "machine_us"), fig(m, "machine_us"), 1)
    for scen, mode, label in [("select50", m, f"-M {m}, 50 clients") for m in MODES] + [("select500", "simple", "-M simple, 500 clients")]:
        d, p, t, m = (S[(scen, mode, x)] for x in TARGETS)
        row(f"throughput tps, {label}", fig(d, "tps"), fig(p, "tps") if p else None, fig(t, "tps"), fig(m, "tps"))
    ld = lat["direct"]
    if ld:
        for k, digits in (("mean", 1), ("p99", 0)):
            added = [lat[x] and lat[x][k] - ld[k] for x in POOLERS]
            row(f"added {k} latency µs, 1 client", None, added[0], added[1], added[2], digits,
                direct=f"(base {fnum(ld[k], digits)})",
                ratio_d=f"{ratio(lat['tidepool'] and lat['tidepool'][k], ld[k])} ({k})")
    if lat_rounds:
        for k in ("mean", "p50"):
            row(f"added {k} latency µs, 1 client: median of per-round differences", None,
                *(lat_added[(x, k)][0] for x in POOLERS), 1, direct="—")
    idd = idle["direct"]
    per = [idle[x] and idle[x]["per_client_kib"] for x in POOLERS]
    row("memory KiB per idle client", None, per[0], per[1], per[2], 2,
        direct=f"{fnum(idd and idd['per_client_kib'], 1)} (PSS per backend)",
        ratio_d=ratio(per[1], idd and idd["per_client_kib"], 4))
    mc = [many[x] for x in POOLERS]
    row(f"{env['many_clients']:,} clients: errors", None, *(x and x["errors"] for x in mc), direct="—")
    row(f"{env['many_clients']:,} clients: queries/s", None, *(x and x["qps"] for x in mc), direct="—")
    row(f"{env['many_clients']:,} clients: p99 latency ms", None, *(x and x["p99"] / 1000 for x in mc), 1,
        direct="—")
    po, rp = R[("primary_only", "extended")], R[("replicas", "extended")]
    if po and rp:
        w(f"| read scaling: tps, primary + 2 replicas vs primary alone (-M extended, 50 clients, 1 thread) | — | — | "
          f"{fnum(rp['tps'])} vs {fnum(po['tps'])} | — | — | — | {ratio(rp['tps'], po['tps'])} (vs primary alone) |")
    pc, rc = R[("primary_only_capped", "extended")], R[("replicas_capped", "extended")]
    if pc and rc:
        w(f"| read scaling where the database is the bottleneck (each server capped at {db_cpu(results)} of a core): "
          f"tps, primary + 2 replicas vs primary alone (-M extended, 50 clients, 1 thread) | — | — | "
          f"{fnum(rc['tps'])} vs {fnum(pc['tps'])} | — | — | — | {ratio(rc['tps'], pc['tps'])} (vs primary alone) |")
    elif "read_scaling_capped" in stubs:
        w(f"| read scaling where the database is the bottleneck | — | — | {stubs['read_scaling_capped']} | — | — | — | — |")
    micro = micro_stats(results)
    if micro:
        x = micro[0]
        w(f"| classifier ns/statement, `{x['statement'][:40]}…`: parsed / text cache / template memo "
          f"(micro-benchmark) | — | — | {fnum(x['parsed_ns'])} / {fnum(x['text_cache_ns'])} / "
          f"{fnum(x['template_memo_ns'])} | — | — | — | — |")
    RI = routing_instruction_stats(results)
    for m in ("simple", "extended"):
        a, c = RI.get(("primary_only", m)), RI.get(("classify_only", m))
        if a is None or c is None:
            continue
        # Instructions to µs at the pace tidepool ran them in scenario 1
        # (its user CPU per transaction over its instructions per transaction).
        s1, i1 = S[("select50", m, "tidepool")], I.get(("tidepool", m))
        est = ""
        if s1 and s1.get("user_us") and i1:
            est = f" ≈ {fnum((c - a) * s1['user_us'] / i1, 2)} µs"
        w(f"| routing decision, user-space instructions/txn, -M {m} (callgrind: `bench_routed` with "
          f"`tidepool.route=primary` minus `bench`) | — | — | {fnum(c - a)}{est} ({fnum(c)} vs {fnum(a)}) | — | — | — | "
          f"{ratio(c, a)} |")
    for m, what in (("simple", "new literals each time: the client's template memo"), ("extended", "one text: cached")):
        a, c = R[("primary_only", m)], R[("classify_only", m)]
        if a and c and a["pooler_us"] is not None and c["pooler_us"] is not None:
            w(f"| classifier cost µs/txn, -M {m} ({what}) | — | — | {fnum(c['pooler_us'] - a['pooler_us'], 1)} | — | — | — | "
              f"{ratio(c['pooler_us'], a['pooler_us'])} (pooler CPU vs no routing) |")
    w("")
    w("Ratios: above 1× means tidepool has more of it (good for throughput, bad for CPU, latency "
      "and memory). Pooler CPU is the pooler process alone; machine CPU is all CPU time on the "
      "machine (PostgreSQL, pgbench, pooler) per transaction, which direct PostgreSQL has too. "
      "Added latency is the pooler's latency minus direct's; its tidepool / direct column "
      "compares whole latencies.")
    if not env["pgbouncer_prepared"]:
        w(f"{env['pgbouncer']} has no `max_prepared_statements` (added in 1.21), so it cannot run "
          "`pgbench -M prepared` in transaction mode; it sits that run out.")
    w("")
    for f in files:
        name = os.path.basename(f)
        w(f"![{name}]({rel[name]})")
        w("")
    if plot_note:
        w(plot_note)
        w("")

    # Environment
    w("## Environment")
    w("")
    w("| | |")
    w("|---|---|")
    for k, label in [("cpu", "CPU"), ("cores", "cores"), ("memory_gb", "memory GB"), ("os", "OS"),
                     ("kernel", "kernel"), ("postgres", "PostgreSQL"), ("pgbench", "pgbench"),
                     ("pgbouncer", "PgBouncer"), ("rustc", "rustc")]:
        w(f"| {label} | {env.get(k, '')} |")
    dirty = " (with uncommitted changes in src/)" if env.get("tidepool_dirty") else ""
    mt = env.get("tidepool_mt_threads")
    threads = ("two processes: “1 thread” (`--threads 1`, a single-threaded runtime) and “all cores” "
               + (f"(`--threads {mt}`, a multi-threaded runtime)" if mt else "(not run)"))
    w(f"| tidepool | commit `{env.get('tidepool_commit', '?')}`{dirty}, release build, {threads} |")
    w(f"| open files | {env.get('fd_note', '')} |")
    bg = []
    for name in ("background-start", "background-end"):
        path = os.path.join(args.dir, name)
        bg.append(open(path).read().strip() + "%" if os.path.exists(path) else "?")
    w(f"| other work | machine busy while no benchmark load ran (2 s samples): {bg[0]} before, "
      f"{bg[1]} after |")
    steal = env.get("steal_percent")
    if steal is not None:
        w(f"| hypervisor steal | {steal}% of all CPU time during the run was taken by the host "
          "(other virtual machines): CPU-time figures move with it, instruction counts do not |")
    w(f"| run | {env['rounds']} round(s) × {env['duration']} s per scenario (scenario 1 at 50 clients: "
      f"{env.get('cpu_rounds', env['rounds'])} × {env.get('cpu_duration', env['duration'])} s; scenarios 6–7: "
      f"{env.get('routing_duration', env['duration'])} s runs), memory {env['mem_rounds']} round(s); "
      f"{args.elapsed} s in all, of which {args.setup} s setup and builds |")
    w("")
    w("PostgreSQL: a scratch cluster (`fsync = off`, `synchronous_commit = off`, "
      "`full_page_writes = off`, `shared_buffers = 256MB`, `max_connections = 600`), pgbench "
      "data at scale 10, run by the unprivileged `postgres` user. The benchmark user `bench` "
      "logs in with `trust` everywhere (PostgreSQL, PgBouncer, tidepool), so no run pays for "
      "SCRAM. Both poolers: transaction mode, pool size 20, `max_client_conn = 11000`, "
      "no minimum pool, no per-connection log lines; PgBouncer and tidepool run as the "
      "`postgres` user. The configurations are at the end.")
    w("")

    # Scenario 1/2
    w("## 1. CPU per transaction and 2. throughput (pgbench -S)")
    w("")
    w("`pgbench -S` (one primary-key SELECT per transaction), `-j 2`; 50 clients: "
      f"{env.get('cpu_rounds', env['rounds'])} rounds of {env.get('cpu_duration', env['duration'])} s, "
      f"500 clients: {env['rounds']} rounds of {env['duration']} s. Pooler CPU is utime+stime of the pooler process (all threads, "
      "`/proc/PID/stat`) over the run, divided by the transactions pgbench reports; machine CPU is "
      "all busy CPU time (`/proc/stat`, without the hypervisor's steal) over the run, divided likewise, so direct PostgreSQL has a "
      "figure too. “cores” is the pooler's CPU time over wall time. Direct PostgreSQL runs one "
      "backend per client (no pool).")
    w("")
    w("| clients | mode | target | tps (range) | vs direct | vs PgBouncer | pooler CPU µs/txn (range) | user / system µs/txn | pooler cores | switches/txn (voluntary / involuntary) | machine CPU µs/txn | failed txns |")
    w("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scen, modes, clients in (("select50", MODES, 50), ("select500", ["simple"], 500)):
        for mode in modes:
            d, p = S[(scen, mode, "direct")], S[(scen, mode, "pgbouncer")]
            for t in TARGETS:
                s = S[(scen, mode, t)]
                if not s:
                    why = skipped(results, scen, mode, t) or "no data"
                    w(f"| {clients} | {mode} | {LABELS[t]} | skipped: {why} | | | | | | | | |")
                    continue
                lo, hi = s["tps_range"]
                plo, phi = s["pooler_range"]
                cpu = (f"{fnum(s['pooler_us'], 1)} ({fnum(plo, 1)}–{fnum(phi, 1)})"
                       if s["pooler_us"] is not None else "—")
                fails = fnum(s["failed"])
                if s["bad_status"]:
                    fails += f" ({s['bad_status']} run(s) exited non-zero)"
                w(f"| {clients} | {mode} | {LABELS[t]} | {fnum(s['tps'])} ({fnum(lo)}–{fnum(hi)}) | "
                  f"{ratio(s['tps'], d and d['tps']) if t != 'direct' else '—'} | "
                  f"{ratio(s['tps'], p and p['tps']) if t in TIDEPOOLS else '—'} | {cpu} | "
                  f"{split_cell(s)} | "
                  f"{fnum(s['pooler_cores'], 2) if s['pooler_cores'] is not None else '—'} | "
                  f"{switch_cell(s)} | "
                  f"{fnum(s['machine_us'], 1)} | {fails} |")
    w("")
    w("Pooler CPU per transaction, tidepool / PgBouncer: the ratio of the medians, then the "
      "median of the per-round ratios (the two poolers ran back to back in each round, so a "
      "round's ratio cancels most of the noise the rounds do not share):")
    w("")
    for scen, mode, label in [("select50", m, f"-M {m}, 50 clients") for m in MODES] + [("select500", "simple", "-M simple, 500 clients")]:
        for x in TIDEPOOLS:
            p, t = S[(scen, mode, "pgbouncer")], S[(scen, mode, x)]
            pr = paired_ratio(results, scen, mode, x)
            w(f"- {label}, {LABELS[x]}: {ratio(t and t['pooler_us'], p and p['pooler_us'])}"
              + (f" ({fnum(t['pooler_us'], 1)} vs {fnum(p['pooler_us'], 1)} µs)" if t and p and t['pooler_us'] and p['pooler_us'] else "")
              + (f"; per round {pr['median']:.2f}× ({pr['lo']:.2f}–{pr['hi']:.2f}×), lower in "
                 f"{pr['below']} of {pr['n']}" if pr else ""))
    w("")

    w("The pooler's CPU time is mostly system time: the kernel's work for its `send`/`recv` "
      "calls (TCP over loopback, waking the process at the other end) and for switching to "
      "and from it. Switches: voluntary ones are the pooler going to sleep with nothing to do "
      "(then woken: the costly path), involuntary ones are the scheduler preempting it, mostly "
      "when a `send` wakes a process that takes the CPU. On a virtual machine whose neighbours "
      "take CPU time (see hypervisor steal under Environment) these vary from run to run by "
      "more than the poolers differ; the instruction counts below do not.")
    w("")

    # Scenario 1b
    w("## 1b. User-space instructions per transaction (callgrind)")
    w("")
    if I:
        runs = sorted({r["txns_per_client"] for r in results if r.get("scenario") == "instructions"})
        lo, hi = (runs[0], runs[-1]) if runs else (0, 0)
        w("Each pooler runs afresh under `valgrind --tool=callgrind` while `pgbench -S -c 50` runs "
          f"{lo} and then {hi} transactions per client; the difference in counted instructions over "
          f"the difference in transactions ({(hi - lo) * 50:,}) is the pooler's own user-space work per "
          "transaction, start-up and pool warm-up cancelled out. Exact and repeatable (the same "
          "count for the same binaries and inputs, whatever else the machine does), but blind "
          "to the kernel: system calls and their cost are not in it.")
        w("")
        w("| mode | PgBouncer | tidepool | tidepool / PgBouncer |")
        w("|---|---:|---:|---:|")
        for m in ("simple", "extended"):
            p, t = I.get(("pgbouncer", m)), I.get(("tidepool", m))
            w(f"| -M {m} | {fnum(p)} | {fnum(t)} | {ratio(t, p)} |")
        top = callgrind_top(results, "tidepool", "simple")
        if top:
            w("")
            w("Where tidepool's instructions go (`-M simple`, self cost per transaction, top "
              f"{len(top)} functions; async functions include what the compiler inlined into them):")
            w("")
            w("| instructions/txn | function |")
            w("|---:|---|")
            for name, cost in top:
                w(f"| {cost:,.0f} | `{name[:110]}` |")
    else:
        w("Not measured in this run (`--callgrind`; off in quick runs, or valgrind missing).")
    w("")

    # Scenario 3
    w("## 3. Added latency (1 client)")
    w("")
    w(f"`pgbench -S -M simple -c 1 -l`, {env['duration']} s per round; mean and percentiles over "
      "every transaction in the per-transaction logs (all rounds pooled).")
    w("")
    w("| target | transactions | tps | mean µs | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | added mean µs | added p99 µs | pooler CPU µs/txn |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in TARGETS:
        x = lat[t]
        if not x:
            w(f"| {LABELS[t]} | no data | | | | | | | | | | |")
            continue
        am = fnum(x["mean"] - ld["mean"], 1) if ld and t != "direct" else "—"
        a99 = fnum(x["p99"] - ld["p99"]) if ld and t != "direct" else "—"
        w(f"| {LABELS[t]} | {fnum(x['n'])} | {fnum(x['tps'])} | {fnum(x['mean'], 1)} | {fnum(x['p50'])} | "
          f"{fnum(x['p90'])} | {fnum(x['p99'])} | {fnum(x['p999'])} | {fnum(x['max'])} | {am} | {a99} | "
          f"{fnum(x['pooler_us'], 1) if x['pooler_us'] is not None else '—'} |")
    w("")
    if lat_rounds:
        w("Per round (each round runs the four back to back, so a disturbance that hits one round "
          "shows here instead of swamping the pooled figures): mean / p50 / p99 µs.")
        w("")
        w("| round | direct | PgBouncer | tidepool, 1 thread | tidepool, all cores | added mean, PgBouncer | "
          "added mean, 1 thread | added mean, all cores |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rnd in sorted(lat_rounds):
            v = lat_rounds[rnd]
            cell = lambda t: (f"{fnum(v[t]['mean'], 1)} / {fnum(v[t]['p50'])} / {fnum(v[t]['p99'])}"
                              if t in v else "—")
            add = lambda t: fnum(v[t]["mean"] - v["direct"]["mean"], 1) if t in v and "direct" in v else "—"
            w(f"| {rnd} | {cell('direct')} | {cell('pgbouncer')} | {cell('tidepool')} | {cell('tidepool_mt')} | "
              f"{add('pgbouncer')} | {add('tidepool')} | {add('tidepool_mt')} |")
        w("")
        for k in ("mean", "p50", "p99"):
            parts = []
            for t in POOLERS:
                m, (lo, hi) = lat_added[(t, k)]
                parts.append(f"{LABELS[t]} {fnum(m, 1)} ({fnum(lo, 1)} to {fnum(hi, 1)})")
            w(f"- added {k} µs, median of the per-round differences (range): " + "; ".join(parts))
        w("")

    # Scenario 4
    w("## 4. Memory per idle client")
    w("")
    w(f"Each round starts the pooler afresh, fills its pool with a 1 s pgbench run of 20 "
      f"clients, reads its RSS (`VmRSS`), opens {env['idle_clients']:,} client connections with "
      f"`tools/loadgen` ({100} connection attempts in flight at a time; each logs in, runs one "
      f"`select 1`, then idles), waits {env.get('settle', 2)} s and reads RSS again. Per client = "
      "growth / clients. "
      "tidepool runs with its default `park_idle_clients_after = \"1s\"`: a client idle for "
      "a second gives up its task and buffers and waits in a shared epoll set, so the reading "
      "is of parked clients. "
      f"Direct PostgreSQL cannot take {env['idle_clients']:,} connections (one process each); for "
      f"scale it gets {env['direct_idle']} idle connections, measured as the growth of the summed "
      "PSS of all PostgreSQL processes.")
    w("")
    w("| target | clients | connected | errors | connect time s | before | with clients | after they left | per client KiB (range) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in TARGETS:
        x = idle[t]
        if not x:
            continue
        lo, hi = x["range"]
        unit = "KiB PSS" if x["metric"] != "rss" else "KiB RSS"
        w(f"| {LABELS[t]} | {fnum(x['clients'])} | {fnum(x['connected'])} | {fnum(x['errors'])} | "
          f"{fnum(x['connect_secs'], 1)} | {fnum(x['before_kb'])} {unit} | {fnum(x['after_kb'])} | "
          f"{fnum(x['after_close_kb'])} | {fnum(x['per_client_kib'], 2)} ({fnum(lo, 2)}–{fnum(hi, 2)}) |")
    kinds = [k for t in TARGETS if idle[t] for k in idle[t]["error_kinds"]]
    if kinds:
        w("")
        w("Errors seen: " + "; ".join(f"`{k['message']}` ×{k['count']}" for k in kinds))
    w("")

    # Scenario 5
    w(f"## 5. {env['many_clients']:,} busy clients through a pool of 20")
    w("")
    w(f"`tools/loadgen run`: {env['many_clients']:,} connections (opened 100 at a time), then all "
      f"start together and run `select 1` (simple protocol) in a loop for {env['duration']} s. "
      "Latency is per query, from send to result, so it includes the wait for a pooled server. "
      "Throughput counts queries finished before the deadline. Pooler CPU is over the timed part "
      "only. Direct PostgreSQL is not run: it would need 10,000 backends.")
    w("")
    w("| target | connected | errors | queries/s (range) | mean ms | p50 ms | p99 ms | p99.9 ms | max ms | queries per client min / median | pooler CPU µs/query | connect time s |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in POOLERS:
        x = many[t]
        if not x:
            continue
        lo, hi = x["qps_range"]
        ms = lambda v: fnum(v / 1000, 1) if v is not None else "n/a"  # noqa: E731
        w(f"| {LABELS[t]} | {fnum(x['connected_min'])} / {fnum(x['clients'])} | {fnum(x['errors'])} | "
          f"{fnum(x['qps'])} ({fnum(lo)}–{fnum(hi)}) | {ms(x['mean'])} | {ms(x['p50'])} | {ms(x['p99'])} | "
          f"{ms(x['p999'])} | {ms(x['max'])} | {fnum(x['per_client_min'])} / {fnum(x['per_client_median'])} | "
          f"{fnum(x['pooler_us'], 1)} | {fnum(x['connect_secs'], 1)} |")
    kinds = [(t, k) for t in POOLERS if many[t] for k in many[t]["error_kinds"]]
    w("")
    if kinds:
        w("Errors seen: " + "; ".join(f"{t}: `{k['message']}` ×{k['count']}" for t, k in kinds))
    else:
        w("No connection or query errors.")
    w("")

    # Scenarios 6 and 7
    if "read_scaling" in stubs or "classifier" in stubs or not any(R.values()):
        w("## 6. Read scaling and 7. classifier cost")
        w("")
        for key, label in (("read_scaling", "6. Read scaling (primary + two replicas vs primary alone)"),
                           ("classifier", "7. Classifier cost (routing decision per query)")):
            w(f"- {label}: **{stubs.get(key, 'not run')}** — no numbers.")
        w("")
        micro_table(w, results)
    else:
        w("## 6. Read scaling (primary + two replicas vs primary alone)")
        w("")
        w("A second tidepool process (scenarios 1–5 ran without replicas or health checks) with "
          "two databases on the same primary: `bench`, the primary alone, and `bench_routed`, the "
          "primary and two streaming replicas (`pg_basebackup -R`, same settings) with default "
          "`[routing]` settings, so `pgbench -S` reads go to the replicas. `pgbench -S -M extended -c 50 "
          f"-j 2`, {env.get('routing_duration', env['duration'])} s per run. Server CPU is the CPU time of each PostgreSQL "
          "cluster's processes (`/proc`) over the run: it shows where the reads ran.")
        w("")
        w("| variant | tps (range) | vs primary alone | pooler CPU µs/txn | server CPU µs/txn | server CPU: primary / replica 1 / replica 2 | failed txns |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        cap = db_cpu(results)
        for v, label, base in (
                ("primary_only", "primary alone (`bench`)", "primary_only"),
                ("replicas", "primary + 2 replicas (`bench_routed`)", "primary_only"),
                ("classify_only", "`bench_routed`, `tidepool.route=primary`", "primary_only"),
                ("primary_only_capped", f"6b: primary alone, each server capped at {cap} of a core", "primary_only_capped"),
                ("replicas_capped", f"6b: primary + 2 replicas, each server capped at {cap} of a core",
                 "primary_only_capped")):
            x = R[(v, "extended")]
            if not x:
                continue
            lo, hi = x["tps_range"]
            sh = " / ".join(f"{100 * y:.0f}%" for y in x["shares"]) if x["shares"] else "n/a"
            fails = fnum(x["failed"]) + (f" ({x['bad_status']} run(s) exited non-zero)" if x["bad_status"] else "")
            w(f"| {label} | {fnum(x['tps'])} ({fnum(lo)}–{fnum(hi)}) | "
              f"{ratio(x['tps'], R[(base, 'extended')]['tps']) if R[(base, 'extended')] else 'n/a'} | "
              f"{fnum(x['pooler_us'], 1)} | {fnum(x['server_us'], 1)} | {sh} | {fails} |")
        w("")
        w(f"All three PostgreSQL servers, pgbench and tidepool share this machine's {env['cores']} cores, "
          "so in the first two rows replicas add no CPU: they show that reads move to the replicas and what "
          "routing costs, not the scaling that replicas on other hosts would give.")
        w("")
        if R[("replicas_capped", "extended")]:
            w(f"**6b, the database as the bottleneck.** As on separate hosts, each PostgreSQL server gets its own "
              f"CPU: a CPU cgroup per cluster (postmaster and every backend) capped at {cap} of a core "
              "(`cpu.cfs_quota_us`/`cpu.max`, `./scripts/bench --db-cpu`), for these runs only. The primary "
              "alone then has that much CPU for every read, the routed database has the two replicas' caps "
              "(reads go to replicas only; the primary's cap is idle but for health checks), so the ideal is "
              "2×; what keeps it below is in the server CPU µs/txn column (a read costs a hot standby more than "
              "the primary, and a throttled server's backends wait for their next period). pgbench and tidepool "
              f"are not capped. Runs of {env['duration']} s.")
        elif "read_scaling_capped" in stubs:
            w(f"6b (the database as the bottleneck, each server's CPU capped): {stubs['read_scaling_capped']}.")
        w("")
        w("## 7. Classifier cost")
        w("")
        micro_table(w, results)
        w("The same routing tidepool: `bench` (no replicas: no statement is classified) against "
          "`bench_routed` with `PGOPTIONS='-c tidepool.route=primary'`, where every transaction's "
          "first statement is still classified (and checked for a routing hint) but runs on the "
          "primary, so both do the same server work. The difference in pooler CPU per transaction is "
          "the routing decision's cost. With `-M simple` every `pgbench -S` statement has a different "
          "literal: the shared text cache misses, and the client's template memo (which matches the "
          "same statement with other literals) answers after the first; with `-M extended` the "
          "text is the same (`… WHERE aid = $1`). This difference of two noisy figures is coarse; "
          "the micro-benchmark above is exact to a few nanoseconds.")
        w("")
        w("| mode | pooler CPU µs/txn, no routing | with classification | cost µs/txn | ratio | tps, no routing | tps, with classification | server CPU on replicas |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|")
        for m in ("simple", "extended"):
            a, c = R[("primary_only", m)], R[("classify_only", m)]
            if not a or not c:
                continue
            cost = (c["pooler_us"] - a["pooler_us"]) if a["pooler_us"] is not None and c["pooler_us"] is not None else None
            rep_share = f"{100 * (c['shares'][1] + c['shares'][2]):.0f}%" if c["shares"] else "n/a"
            w(f"| {m} | {fnum(a['pooler_us'], 1)} | {fnum(c['pooler_us'], 1)} | {fnum(cost, 1)} | "
              f"{ratio(c['pooler_us'], a['pooler_us'])} | {fnum(a['tps'])} | {fnum(c['tps'])} | {rep_share} |")
        w("")
        RI = routing_instruction_stats(results)
        if RI:
            w("**7b, exact.** The same two databases with the routing tidepool started afresh under "
              "`valgrind --tool=callgrind` for `pgbench -S -c 50` with 20 and then 80 transactions per "
              "client (as in 1b): user-space instructions per transaction.")
            w("")
            w("| mode | `bench` (no routing) | `bench_routed`, `tidepool.route=primary` | routing decision |")
            w("|---|---:|---:|---:|")
            for m in ("simple", "extended"):
                a, c = RI.get(("primary_only", m)), RI.get(("classify_only", m))
                if a is not None and c is not None:
                    w(f"| {m} | {fnum(a)} | {fnum(c)} | {fnum(c - a)} |")
            w("")

    # Profile
    perf = os.path.join(args.dir, "perf-top.txt")
    if os.path.exists(perf) and os.path.getsize(perf) > 0:
        w("## Profile (tidepool, pgbench -S -M extended, 50 clients)")
        w("")
        w("`perf record -F 999 -g -p PID` for the run's length (`./scripts/bench --perf`), then "
          "`perf report --no-children`. By binary (`--sort dso`):")
        w("")
        w("```")
        dso = os.path.join(args.dir, "perf-dso.txt")
        if os.path.exists(dso):
            with open(dso) as f:
                w(f.read().rstrip())
        w("```")
        w("")
        w("Top symbols by self time (`--sort symbol`):")
        w("")
        w("```")
        with open(perf) as f:
            w("".join(f.readlines()[:25]).rstrip())
        w("```")
        w("")
        w("Without a hardware PMU (virtual machines sample on `cpu-clock`), kernel samples "
          "gather where interrupts are re-enabled, e.g. `finish_task_switch` and "
          "`_raw_spin_unlock_irqrestore`: read those as kernel time in general (socket I/O, "
          "wake-ups, context switches), not as those functions alone.")
        w("")

    # Commands
    w("## Exact commands")
    w("")
    w("Run from the repository root. Ports are chosen free at each run (these are this run's); "
      "`$DIR` is the scratch dir (`/tmp/tidepool-bench`). `bench` is the database and user; "
      "`--watch-pid` is the pooler's pid.")
    w("")
    w("```sh")
    cmds = os.path.join(args.dir, "commands.txt")
    if os.path.exists(cmds):
        with open(cmds) as f:
            text = f.read().replace(args.dir, "$DIR").replace(args.root + "/", "")
        for line in text.splitlines():
            w(line.rstrip())
    w("```")
    w("")
    for name, lang in (("pgbouncer.ini", "ini"), ("tidepool.toml", "toml")):
        path = os.path.join(args.dir, "raw", name)
        if os.path.exists(path):
            w(f"`{name}`:")
            w("")
            w(f"```{lang}")
            with open(path) as f:
                w(f.read().replace(args.dir, "$DIR").rstrip())
            w("```")
            w("")
    w("## Caveats")
    w("")
    w("- One machine: pgbench and the load generator take CPU from the pooler and PostgreSQL; "
      "throughput is of the whole system, not the pooler alone.")
    w("- PgBouncer is single-threaded (at most one core). tidepool's default runtime has a worker per "
      "core (“all cores”); `--threads 1` gives one event loop (“1 thread”). On this machine "
      "PostgreSQL and pgbench share the same cores, so the pooler is rarely the bottleneck: the "
      "“pooler cores” column shows how much each used.")
    w("- CPU time comes from `/proc` in clock ticks "
      f"(1/{env['clk_tck']} s); short (`--quick`) runs are coarse.")
    w("- Direct PostgreSQL gets one backend per client, not a pool of 20.")
    w("")

    md = os.path.join(args.out, "benchmarks.md")
    # The sections of separate long runs (scripts/soak, scripts/faults) stay.
    kept = []
    if os.path.exists(md):
        text = open(md).read()
        for name in ("soak", "faults"):
            m = re.search(rf"<!-- {name}: written by scripts/{name} -->.*?<!-- /{name} -->\n", text, re.S)
            if m:
                kept.append(m.group(0))
    with open(md, "w") as f:
        f.write("\n".join(L))
        for section in kept:
            f.write("\n\n" + section)
    print(f"report: {md}" + "".join(f", {os.path.basename(x)}" for x in files), file=sys.stderr)


if __name__ == "__main__":
    main()
