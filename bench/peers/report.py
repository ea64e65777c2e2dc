"""Summarises bench/peers.sh's rows: per server and connection count, over all rounds, requests
per second (total requests / total time), p50 and p99 (median over rounds), server CPU per
request (process tree's CPU delta / requests) and peak resident memory; then Osprey's ratios.
Row: server conns cpu_before rss_before cpu_after rss_after WRK requests errors p50_us p99_us dur_us"""
import statistics, sys
from collections import defaultdict

cells = defaultdict(list)
order = []
for line in open(sys.argv[1]):
    f = line.split()
    key = (f[0], int(f[1]))
    if key not in cells:
        order.append(key)
    cells[key].append(dict(cpu=float(f[4]) - float(f[2]), rss=float(f[5]), req=int(f[7]), err=int(f[8]),
                           p50=float(f[9]), p99=float(f[10]), dur=int(f[11])))
stats = {}
for key, rs in cells.items():
    req, dur = sum(r["req"] for r in rs), sum(r["dur"] for r in rs) / 1e6
    stats[key] = dict(rps=req / dur if dur else 0.0, p50=statistics.median(r["p50"] for r in rs) / 1e3,
                      p99=statistics.median(r["p99"] for r in rs) / 1e3, err=sum(r["err"] for r in rs),
                      cpu=1e6 * sum(r["cpu"] for r in rs) / req if req else float("nan"),
                      rss=max(r["rss"] for r in rs), req=req)
print("| server | connections | requests | errors | req/s | p50 ms | p99 ms | server CPU µs/req | RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for key in sorted(order, key=lambda k: (k[1], order.index(k))):
    s = stats[key]
    print(f"| {key[0]} | {key[1]} | {s['req']} | {s['err']} | {s['rps']:.0f} | {s['p50']:.2f} | {s['p99']:.2f} "
          f"| {s['cpu']:.1f} | {s['rss']:.0f} |")
peers = [p for p in ("mlserver", "ray") if any(k[0] == p for k in order)]
if peers:
    print()
    print("| connections | " + " | ".join(f"req/s osprey / {p} | CPU/req {p} / osprey" for p in peers) + " |")
    print("|---|" + "---|---|" * len(peers))
    for c in sorted({k[1] for k in order}):
        o = stats.get(("osprey", c))
        row = []
        for p in peers:
            s = stats.get((p, c))
            if o and s and s["rps"] > 0 and o["cpu"] > 0:
                row += [f"{o['rps'] / s['rps']:.1f}x", f"{s['cpu'] / o['cpu']:.1f}x"]
            else:
                row += ["-", "-"]
        print(f"| {c} | " + " | ".join(row) + " |")
