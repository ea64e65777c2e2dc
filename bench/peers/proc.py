"""CPU seconds (user + system) and resident memory (MiB) of a process and all its
descendants, read from /proc. Usage: proc.py PID -> "cpu_s rss_mib" """
import os, sys

root = int(sys.argv[1])
children = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(p))
tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
cpu, rss, todo = 0.0, 0, [root]
while todo:
    pid = todo.pop()
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        cpu += (int(f[11]) + int(f[12])) / tick
        rss += int(open(f"/proc/{pid}/statm").read().split()[1]) * page
    except OSError:
        pass
    todo.extend(children.get(pid, []))
print(f"{cpu:.3f} {rss / 2**20:.1f}")
