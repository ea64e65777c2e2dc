#!/usr/bin/env python3
"""A pipeline of the repository served as one model, checked with the official clients.

Over HTTP and gRPC: the pipeline's metadata lists its first stage's inputs and last stage's
outputs; it is ready; a batch of held-out images goes through, the response names the variant
and node of every stage (`pipeline_stages`), and its output equals, to 1e-5, what the three
stage models give when called one after another by the client with the same variants pinned.

Usage: pipeline.py --http HOST:PORT --grpc HOST:PORT --models DIR [--pipeline digits_pipeline]
"""

import argparse
import os
import sys
import tomllib

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

FAILURES = []
CHECKS = 0


def check(cond, what):
    global CHECKS
    CHECKS += 1
    if not cond:
        FAILURES.append(what)
        print(f"FAIL: {what}", flush=True)


def stages_of(params):
    """`stage=model/variant@node,...` -> [(stage, model, variant, node)]"""
    out = []
    for part in params.split(","):
        stage, rest = part.split("=", 1)
        model, rest = rest.split("/", 1)
        variant, node = rest.split("@", 1)
        out.append((stage, model, variant, node))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--pipeline", default="digits_pipeline")
    a = ap.parse_args()
    pdir = os.path.join(a.models, a.pipeline)
    with open(os.path.join(pdir, "pipeline.toml"), "rb") as f:
        spec = tomllib.load(f)
    first = spec["stages"][0]["model"]
    with open(os.path.join(a.models, first, "model.toml"), "rb") as f:
        first_spec = tomllib.load(f)
    shape = first_spec["inputs"][0]["shape"][1:]
    x = np.fromfile(os.path.join(pdir, "eval", "inputs.bin"), dtype="<f4").reshape([-1] + shape)
    batch = x[:8].astype(np.float32)

    for proto, mod, url in (("http", httpclient, a.http), ("grpc", grpcclient, a.grpc)):
        c = mod.InferenceServerClient(url=url)
        check(c.is_model_ready(a.pipeline), f"{proto}: pipeline ready")
        md = c.get_model_metadata(a.pipeline)
        if proto == "grpc":
            names_in = [t.name for t in md.inputs]
            names_out = [t.name for t in md.outputs]
        else:
            names_in = [t["name"] for t in md["inputs"]]
            names_out = [t["name"] for t in md["outputs"]]
        check(names_in == ["image"], f"{proto}: metadata inputs {names_in}")
        check(names_out == ["calibrated"], f"{proto}: metadata outputs {names_out}")
        for rows in (1, 8):
            inp = mod.InferInput("image", [rows] + shape, "FP32")
            inp.set_data_from_numpy(batch[:rows])
            r = c.infer(a.pipeline, [inp])
            y = r.as_numpy("calibrated")
            check(y is not None and y.shape == (rows, 10), f"{proto}: output shape {None if y is None else y.shape}")
            resp = r.get_response()
            if proto == "grpc":
                params = {k: v.string_param for k, v in resp.parameters.items()}
                name = resp.model_name
            else:
                params = resp.get("parameters", {})
                name = resp.get("model_name")
            check(name == a.pipeline, f"{proto}: model_name {name}")
            st = stages_of(params.get("pipeline_stages", "x=y/z@w"))
            check([s[0] for s in st] == [s["name"] for s in spec["stages"]], f"{proto}: stages {st}")
            # The same variants, called one by one by the client, give the same answer.
            t = batch[:rows]
            for (stage, model, variant, _node), decl in zip(st, spec["stages"]):
                with open(os.path.join(a.models, model, "model.toml"), "rb") as f:
                    ms = tomllib.load(f)
                i = ms["inputs"][0]
                si = mod.InferInput(i["name"], list(t.shape), "FP32")
                si.set_data_from_numpy(t.astype(np.float32))
                t = c.infer(model, [si], model_version=variant).as_numpy(ms["outputs"][0]["name"])
            if y is not None:
                err = float(np.abs(t - y).max())
                check(err <= 1e-5, f"{proto}: pipeline output differs from the stages called one by one by {err}")
        try:
            c.infer(a.pipeline, [inp], model_version="large")
            check(False, f"{proto}: a versioned pipeline address must be refused")
        except InferenceServerException as e:
            check("no versions" in e.message(), f"{proto}: versioned address error: {e.message()}")
    print(f"{CHECKS - len(FAILURES)}/{CHECKS} checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
