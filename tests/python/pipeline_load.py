#!/usr/bin/env python3
"""Bounded closed-loop load on a pipeline over HTTP with tritonclient, every request with a
unique id. Prints one JSON line: sent, ok, refused (429/503/504, told at once), failed (any
other error), duplicates (an answer whose id is not its request's), and the distinct stage
configurations (`pipeline_stages` without nodes) that answered.

Usage: pipeline_load.py --http HOST:PORT --models DIR [--pipeline P] [--seconds S] [--threads N]
"""

import argparse
import json
import os
import threading
import time

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--pipeline", default="digits_pipeline")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=4)
    a = ap.parse_args()
    x = np.fromfile(os.path.join(a.models, a.pipeline, "eval", "inputs.bin"), dtype="<f4").reshape(-1, 8, 8)
    lock = threading.Lock()
    totals = {"sent": 0, "ok": 0, "refused": 0, "failed": 0, "duplicates": 0}
    configs = set()
    errors = []
    stop = time.monotonic() + a.seconds

    def worker(k):
        c = httpclient.InferenceServerClient(url=a.http)
        n = 0
        while time.monotonic() < stop:
            rid = f"w{k}-{n}"
            rows = 1 + n % 3
            i = httpclient.InferInput("image", [rows, 8, 8], "FP32")
            i.set_data_from_numpy(x[(n * 3) % (len(x) - 3):][:rows].astype(np.float32))
            n += 1
            try:
                r = c.infer(a.pipeline, [i], request_id=rid)
                resp = r.get_response()
                y = r.as_numpy("calibrated")
                stages = ",".join(s.split("@")[0] for s in resp["parameters"]["pipeline_stages"].split(","))
                with lock:
                    totals["sent"] += 1
                    if resp.get("id") != rid:
                        totals["duplicates"] += 1
                    elif y is None or y.shape != (rows, 10):
                        totals["failed"] += 1
                        errors.append(f"shape {None if y is None else y.shape}")
                    else:
                        totals["ok"] += 1
                        configs.add(stages)
            except InferenceServerException as e:
                with lock:
                    totals["sent"] += 1
                    if str(e.status()) in ("429", "503", "504"):
                        totals["refused"] += 1
                    else:
                        totals["failed"] += 1
                        errors.append(f"{e.status()} {e.message()}")

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(a.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({**totals, "configurations": sorted(configs), "errors": errors[:5]}))


if __name__ == "__main__":
    main()
