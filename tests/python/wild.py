#!/usr/bin/env python3
"""Models from the wild (tests/wild/, built by scripts/fetch_wild.py) served by Osprey and
checked with tritonclient against onnxruntime run directly on the same file.

Per model (its first variant, addressed as the version), over HTTP (binary and JSON) and gRPC, at batch 1 and 5: every output equals what
onnxruntime gives (max |diff| <= 1e-5 for floats, exactly for integers); the model config
names the engine it runs on (`--engine MODEL=ENGINE`, repeatable).

Usage: wild.py --http HOST:PORT --grpc HOST:PORT --models DIR [--engine magika=onnxruntime]...
"""

import argparse
import os

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from checks import NP, check, finish, load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--engine", action="append", default=[])
    args = ap.parse_args()
    engines = dict(e.split("=", 1) for e in args.engine)
    http = httpclient.InferenceServerClient(args.http)
    grpc = grpcclient.InferenceServerClient(args.grpc)
    names = sorted(n for n in os.listdir(args.models) if os.path.isfile(os.path.join(args.models, n, "model.toml")))
    check(len(names) >= 3, f"three models in {args.models}: {names}")
    for name in names:
        spec, x, _ = load_model(args.models, name)
        inp = spec["inputs"][0]
        outs = [o["name"] for o in spec["outputs"]]
        variant = spec["variants"][0]
        direct = ort.InferenceSession(os.path.join(args.models, name, variant["file"]),
                                      providers=["CPUExecutionProvider"])
        config = http.get_model_config(name)
        want = engines.get(name)
        if want:
            check(config.get("backend") == f"osprey-{want}", f"{name}: backend {config.get('backend')}, expected osprey-{want}")
        worst = 0.0
        for n in (1, 5):
            batch = np.ascontiguousarray(x[:n].astype(NP[inp["datatype"]]))
            ref = direct.run(outs, {inp["name"]: batch})
            for proto, binary in (("http", True), ("http-json", False), ("grpc", True)):
                if proto == "grpc":
                    i = grpcclient.InferInput(inp["name"], list(batch.shape), inp["datatype"])
                    i.set_data_from_numpy(batch)
                    r = grpc.infer(name, [i], model_version=variant["name"], outputs=[grpcclient.InferRequestedOutput(o) for o in outs])
                else:
                    i = httpclient.InferInput(inp["name"], list(batch.shape), inp["datatype"])
                    i.set_data_from_numpy(batch, binary_data=binary)
                    r = http.infer(name, [i], model_version=variant["name"], outputs=[httpclient.InferRequestedOutput(o, binary_data=binary) for o in outs])
                for o, want_arr in zip(outs, ref):
                    got = r.as_numpy(o)
                    ok = got is not None and got.shape == want_arr.shape
                    check(ok, f"{name} {proto} batch {n}: output {o} shape {None if got is None else got.shape}, expected {want_arr.shape}")
                    if not ok:
                        continue
                    if np.issubdtype(want_arr.dtype, np.floating):
                        d = float(np.max(np.abs(got.astype(np.float64) - want_arr.astype(np.float64))))
                        worst = max(worst, d)
                        check(d <= 1e-5, f"{name} {proto} batch {n}: {o} differs from onnxruntime by {d}")
                    else:
                        check(np.array_equal(got, want_arr), f"{name} {proto} batch {n}: {o} differs from onnxruntime")
        print(f"{name}: {config.get('backend')}, max |diff| against onnxruntime {worst:.2e}", flush=True)
    finish(" (models from the wild)")


if __name__ == "__main__":
    main()
