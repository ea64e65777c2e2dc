#!/usr/bin/env python3
"""Every pipeline of the repository served as one model, checked with the official clients.

Over HTTP and gRPC, per pipeline: its metadata lists its first stage's inputs and last stage's
outputs; it is ready; a batch of its held-out inputs goes through, the response names the variant
and node of every stage (`pipeline_stages`), and its output equals, to 1e-5, what the three
stage models give when called one after another by the client with the same variants pinned.

Usage: pipeline.py --http HOST:PORT --grpc HOST:PORT --models DIR [--pipeline NAME]...
(default: every folder of DIR with a pipeline.toml)
"""

import argparse
import os
import tomllib

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from checks import NP, check, finish


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
    ap.add_argument("--pipeline", action="append", help="only this pipeline (repeatable)")
    a = ap.parse_args()
    names = a.pipeline or sorted(d for d in os.listdir(a.models)
                                 if os.path.exists(os.path.join(a.models, d, "pipeline.toml")))
    check(len(names) >= 2, f"at least two pipelines in the repository: {names}")
    for name in names:
        check_pipeline(a, name)
    finish(f" over {', '.join(names)}")


def load_spec(models, model):
    with open(os.path.join(models, model, "model.toml"), "rb") as f:
        return tomllib.load(f)


def check_pipeline(a, pipeline):
    pdir = os.path.join(a.models, pipeline)
    with open(os.path.join(pdir, "pipeline.toml"), "rb") as f:
        spec = tomllib.load(f)
    first_in = load_spec(a.models, spec["stages"][0]["model"])["inputs"][0]
    last_out = load_spec(a.models, spec["stages"][-1]["model"])["outputs"][0]
    shape = first_in["shape"][1:]
    dtype = NP[first_in["datatype"]]
    x = np.fromfile(os.path.join(pdir, "eval", "inputs.bin"), dtype=np.dtype(dtype).newbyteorder("<"))
    batch = x.reshape([-1] + shape)[:8].astype(dtype)

    for proto, mod, url in (("http", httpclient, a.http), ("grpc", grpcclient, a.grpc)):
        c = mod.InferenceServerClient(url=url)
        check(c.is_model_ready(pipeline), f"{proto}: {pipeline} ready")
        md = c.get_model_metadata(pipeline)
        if proto == "grpc":
            names_in = [t.name for t in md.inputs]
            names_out = [t.name for t in md.outputs]
        else:
            names_in = [t["name"] for t in md["inputs"]]
            names_out = [t["name"] for t in md["outputs"]]
        check(names_in == [first_in["name"]], f"{proto}: {pipeline} metadata inputs {names_in}")
        check(names_out == [last_out["name"]], f"{proto}: {pipeline} metadata outputs {names_out}")
        for rows in (1, 8):
            inp = mod.InferInput(first_in["name"], [rows] + shape, first_in["datatype"])
            inp.set_data_from_numpy(batch[:rows])
            r = c.infer(pipeline, [inp])
            y = r.as_numpy(last_out["name"])
            want = (rows, *last_out["shape"][1:])
            check(y is not None and y.shape == want, f"{proto}: {pipeline} output shape {None if y is None else y.shape}")
            resp = r.get_response()
            if proto == "grpc":
                params = {k: v.string_param for k, v in resp.parameters.items()}
                name = resp.model_name
            else:
                params = resp.get("parameters", {})
                name = resp.get("model_name")
            check(name == pipeline, f"{proto}: model_name {name}")
            st = stages_of(params.get("pipeline_stages", "x=y/z@w"))
            check([s[0] for s in st] == [s["name"] for s in spec["stages"]], f"{proto}: stages {st}")
            # The same variants, called one by one by the client, give the same answer.
            t = batch[:rows]
            for (stage, model, variant, _node), decl in zip(st, spec["stages"]):
                ms = load_spec(a.models, model)
                i = ms["inputs"][0]
                si = mod.InferInput(i["name"], list(t.shape), i["datatype"])
                si.set_data_from_numpy(t.astype(NP[i["datatype"]]))
                t = c.infer(model, [si], model_version=variant).as_numpy(ms["outputs"][0]["name"])
            if y is not None:
                err = float(np.abs(t - y).max())
                check(err <= 1e-5, f"{proto}: {pipeline} output differs from the stages called one by one by {err}")
        try:
            c.infer(pipeline, [inp], model_version="large")
            check(False, f"{proto}: a versioned pipeline address must be refused")
        except InferenceServerException as e:
            check("no versions" in e.message(), f"{proto}: versioned address error: {e.message()}")


if __name__ == "__main__":
    main()
