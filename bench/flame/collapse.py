"""Folds `perf script -F comm,tid,ip,sym` output into flame-graph stacks ("a;b;c N" lines,
root first, thread name as the root frame) and prints where the samples fall: by thread; self
time by category (the first frame from the leaf upwards that matches one); and inclusive time
of the serving components (a sample counts for every component on its stack). Usage:
collapse.py PERF_SCRIPT FOLDED_OUT. The folded file renders with any flame-graph tool
(inferno-flamegraph, speedscope)."""
import re, sys
from collections import Counter

SELF = [  # (label, pattern on a frame); the first frame from the leaf that matches any wins
    ("kernel: context switch, wakeup", r"finish_task_switch|_raw_spin_unlock_irqrestore|try_to_wake_up|"
     r"schedule|futex|__x64_sys_futex|select_task_rq|enqueue_task|dequeue_task|ttwu"),
    ("kernel: TCP/IP, sockets", r"^tcp_|^skb_|^ip_|^__ip|^sock_|^__sys_(send|recv)|^__dev|^net_|"
     r"^loopback|^__netif|^inet_|^__tcp|^__skb|^kfree_skb|^copy_(to|from)_user|^_copy_"),
    ("kernel: epoll, syscall entry", r"epoll|^do_syscall_64|^entry_SYSCALL|^syscall_exit|^__x64_sys"),
    ("malloc / free / memcpy", r"malloc|^_int_|cfree|realloc|calloc|memmove|memcpy|memset|unlink_chunk"),
    ("engine (tract, linalg)", r"^tract_|osprey_engine::session|avx512_mmm|^fma_mmm|_mmm_"),
    ("accuracy estimate", r"gateway::estimate|osprey_policy::estimate"),
    ("dispatcher / scheduler", r"osprey_policy::"),
    ("metrics", r"prometheus_client|osprey_server::metrics"),
    ("cluster driver (lock, reply)", r"osprey_server::cluster|osprey_server::agent"),
    ("JSON (serde_json)", r"serde_json|serde::"),
    ("HTTP decode / encode (gateway)", r"osprey_server::http|osprey_server::gateway|osprey_server::protocol"),
    ("gRPC (tonic, prost, h2)", r"^tonic|^prost|^h2::|osprey_server::grpc"),
    ("hyper / axum / tower", r"^hyper|^axum|^tower|^http::"),
    ("tokio runtime", r"^tokio::"),
    ("threads, locks, wakeups", r"futex|pthread|parking_lot|std::sync|std::thread|mpsc"),
    ("libc syscalls", r"__libc_(send|recv|read|write)|^__GI___|^syscall$|^read$|^write$|__vdso"),
    ("BTreeMap (JSON maps, parameters)", r"btree"),
]
INCLUSIVE = [  # serving components, counted wherever they are on the stack
    ("gateway::infer (admission to answer)", r"osprey_server::gateway::Gateway::infer"),
    ("http::decode_and_run (all of a request's handler)", r"osprey_server::http::decode_and_run"),
    ("http::encode_response", r"osprey_server::http::encode_response"),
    ("cluster: submit (lock + dispatch + apply)", r"osprey_server::cluster::Cluster::submit"),
    ("cluster: batch completion", r"CompletionSink>::complete"),
    ("dispatcher (osprey_policy)", r"osprey_policy::"),
    ("engine session.run", r"osprey_engine::session"),
    ("accuracy estimate", r"gateway::estimate"),
    ("metrics", r"prometheus_client|osprey_server::metrics"),
    ("serde_json", r"serde_json"),
    ("hyper h1 parse/encode", r"hyper::proto::h1::role"),
    ("tokio park/unpark", r"tokio::runtime::scheduler::multi_thread::(park|worker::Context::park)|unpark"),
]

stacks, threads, cats, incl = Counter(), Counter(), Counter(), Counter()
frames, comm = [], None
def flush():
    if comm is None:
        return
    thread = re.sub(r"-?\d+$", "", comm)
    threads[thread] += 1
    stacks[";".join([thread] + [f for f in reversed(frames)])] += 1
    label = next((l for f in frames for l, pat in SELF if re.search(pat, f)), None)
    cats[label or "other: " + (frames[0] if frames else "?")[:60]] += 1
    for l, pat in INCLUSIVE:
        if any(re.search(pat, f) for f in frames):
            incl[l] += 1

for line in open(sys.argv[1]):
    if not line.strip():
        flush()
        frames, comm = [], None
    elif not line[0].isspace():
        comm = line.split()[0]
    else:
        parts = line.split(None, 1)
        frames.append(parts[1].strip() if len(parts) > 1 else "?")
flush()
with open(sys.argv[2], "w") as f:
    for s, n in stacks.items():
        f.write(f"{s} {n}\n")
total = sum(threads.values())
print(f"{total} samples")
for t, n in threads.most_common():
    print(f"  thread {t:24} {100 * n / total:5.1f}%")
print("self time by category:")
others = sum(n for c, n in cats.items() if c.startswith("other"))
for c, n in cats.most_common():
    if not c.startswith("other"):
        print(f"  {c:34} {100 * n / total:5.1f}%")
print(f"  {'other':34} {100 * others / total:5.1f}%")
for c, n in cats.most_common(8):
    if c.startswith("other"):
        print(f"      {c[7:]:60} {100 * n / total:4.1f}%")
print("inclusive time of serving components:")
for l, _ in INCLUSIVE:
    print(f"  {l:50} {100 * incl[l] / total:5.1f}%")
