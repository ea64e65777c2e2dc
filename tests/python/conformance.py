#!/usr/bin/env python3
"""Open Inference Protocol conformance of a running Osprey, checked with the official clients.

Drives every model of the repository with tritonclient over HTTP (binary and JSON tensors)
and gRPC, pins every variant and checks its answers against the evaluation set's recorded
predictions, reads metadata, configuration, statistics and the repository index, and checks
error cases over both protocols (the server must stay healthy after each).

Usage: conformance.py --http HOST:PORT --grpc HOST:PORT --models DIR [--max-body BYTES]
Exit status 0 when every check passes; each failure is printed.
"""

import argparse
import csv
import json
import os
import tomllib
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from checks import NP, check, finish, load_model


def expect_error(fn, what, *needles):
    try:
        fn()
    except InferenceServerException as e:
        text = f"{e.status()} {e.message()}"
        for n in needles:
            check(n.lower() in text.lower(), f"{what}: expected '{n}' in error, got: {text}")
        return
    check(False, f"{what}: expected an error, got success")


def http_raw(base, path, body=b"", headers=None, method="POST"):
    # urllib would label a body as a form; the inference routes read JSON.
    headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(f"http://{base}{path}", data=body if method == "POST" else None,
                                 headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--max-body", type=int, default=16 << 20)
    args = ap.parse_args()

    h = httpclient.InferenceServerClient(url=args.http)
    g = grpcclient.InferenceServerClient(url=args.grpc)

    # ---- health and metadata -------------------------------------------------------------
    check(h.is_server_live() and h.is_server_ready(), "HTTP live/ready")
    check(g.is_server_live() and g.is_server_ready(), "gRPC live/ready")
    meta = h.get_server_metadata()
    check(meta["name"] == "osprey", f"server metadata name: {meta}")
    for ext in ("binary_tensor_data", "model_configuration", "statistics"):
        check(ext in meta["extensions"], f"extension {ext} listed")
    gmeta = g.get_server_metadata()
    check(list(gmeta.extensions) == list(meta["extensions"]), "gRPC and HTTP list the same extensions")
    index = h.get_model_repository_index()
    names = sorted({m["name"] for m in index if m.get("state") == "READY"})
    gindex = g.get_model_repository_index()
    check(sorted({m.name for m in gindex.models if m.state == "READY"}) == names, "gRPC repository index")
    on_disk = sorted(d for d in os.listdir(args.models)
                     if any(os.path.exists(os.path.join(args.models, d, f))
                            for f in ("model.toml", "pipeline.toml", "multimodal.toml")))
    check(names == on_disk, f"every bundled model, pipeline and multi-modal model is served: {names} vs {on_disk}")

    # Pipelines are checked by tests/python/pipeline.py.
    for name in [n for n in names if os.path.exists(os.path.join(args.models, n, "model.toml"))]:
        spec, x, rows = load_model(args.models, name)
        inp = spec["inputs"][0]
        out_name = spec["outputs"][0]["name"]
        variants = [v["name"] for v in spec["variants"]]
        check(h.is_model_ready(name) and g.is_model_ready(name), f"{name} ready")
        for v in variants:
            check(h.is_model_ready(name, v) and g.is_model_ready(name, v), f"{name}/{v} ready")
        check(not h.is_model_ready(name, "no-such-variant"), f"{name}: unknown version is not ready")
        check(not g.is_model_ready(name, "no-such-variant"), f"{name}: unknown version is not ready (gRPC)")
        md = h.get_model_metadata(name)
        check(md["inputs"][0]["name"] == inp["name"] and md["inputs"][0]["shape"] == inp["shape"], f"{name} metadata")
        check(md["versions"] == variants, f"{name} versions are its variants")
        gmd = g.get_model_metadata(name)
        check(gmd.inputs[0].datatype == inp["datatype"] and list(gmd.inputs[0].shape) == inp["shape"], f"{name} gRPC metadata")
        cfg = h.get_model_config(name)
        check(cfg["max_batch_size"] >= 1 and cfg["input"][0]["name"] == inp["name"]
              and cfg["input"][0]["dims"] == inp["shape"][1:] and cfg["output"][0]["name"] == out_name,
              f"{name} HTTP config: {cfg}")
        gcfg = g.get_model_config(name).config
        check(gcfg.max_batch_size >= 1 and gcfg.input[0].name == inp["name"]
              and list(gcfg.input[0].dims) == inp["shape"][1:], f"{name} gRPC config")

        # ---- inference: every variant pinned, both protocols, binary and JSON ---------------
        # A classifier's answers are checked against the recorded predictions; a model whose
        # output is not a class distribution (a pipeline's denoiser) against its own HTTP
        # binary answer, so that the three paths agree.
        n = 6
        batch = x[:n]
        out_dim = spec["outputs"][0]["shape"][-1]
        classifier = out_dim == len(spec.get("labels", []))
        for v in variants:
            if classifier:
                want = [int(r[f"{v}_pred"]) for r in rows[:n]]
                same = lambda p: p is not None and list(p.argmax(axis=1)) == want
            else:
                i = httpclient.InferInput(inp["name"], list(batch.shape), inp["datatype"])
                i.set_data_from_numpy(batch)
                ref = h.infer(name, [i], model_version=v).as_numpy(out_name)
                same = lambda p, ref=ref: p is not None and p.shape == (n, out_dim) and np.abs(p - ref).max() <= 1e-6
            # HTTP, binary tensors both ways (tritonclient's default).
            i = httpclient.InferInput(inp["name"], list(batch.shape), inp["datatype"])
            i.set_data_from_numpy(batch)
            r = h.infer(name, [i], model_version=v, outputs=[httpclient.InferRequestedOutput(out_name)])
            p = r.as_numpy(out_name)
            check(same(p), f"{name}/{v} HTTP binary answers")
            check(r.get_response()["parameters"]["variant"] == v, f"{name}/{v} HTTP names its variant")
            # HTTP, JSON tensors both ways.
            i = httpclient.InferInput(inp["name"], list(batch.shape), inp["datatype"])
            i.set_data_from_numpy(batch, binary_data=False)
            r = h.infer(name, [i], model_version=v,
                        outputs=[httpclient.InferRequestedOutput(out_name, binary_data=False)])
            p = r.as_numpy(out_name)
            check(same(p), f"{name}/{v} HTTP JSON answers")
            # gRPC.
            gi = grpcclient.InferInput(inp["name"], list(batch.shape), inp["datatype"])
            gi.set_data_from_numpy(batch)
            gr = g.infer(name, [gi], model_version=v)
            p = gr.as_numpy(out_name)
            check(same(p), f"{name}/{v} gRPC answers")
            resp = gr.get_response()
            check(resp.model_version == v and resp.parameters["variant"].string_param == v,
                  f"{name}/{v} gRPC names its variant")
        # Unpinned: the scheduler chooses; the response says which and whether it was in time.
        i = httpclient.InferInput(inp["name"], [1] + inp["shape"][1:], inp["datatype"])
        i.set_data_from_numpy(x[:1])
        r = h.infer(name, [i])
        params = r.get_response()["parameters"]
        check(params["variant"] in variants and isinstance(params["deadline_met"], bool)
              and 0.0 <= params["estimated_accuracy"] <= 1.0, f"{name} unpinned response parameters: {params}")
        # Triton's timeout parameter (microseconds) and Osprey's deadline_ms are accepted.
        r = h.infer(name, [i], timeout=2_000_000, parameters={"deadline_ms": 1000})
        check(r.as_numpy(out_name).shape == (1, out_dim), f"{name} with timeout and deadline_ms")
        gi = grpcclient.InferInput(inp["name"], [1] + inp["shape"][1:], inp["datatype"])
        gi.set_data_from_numpy(x[:1])
        gr = g.infer(name, [gi], timeout=2_000_000, priority=1)
        check(gr.as_numpy(out_name).shape == (1, out_dim), f"{name} gRPC with timeout and priority")

        # ---- statistics ------------------------------------------------------------------
        st = h.get_inference_statistics(name)["model_stats"]
        check(all(s["name"] == name for s in st) and sum(s["inference_count"] for s in st) >= 3 * n * len(variants),
              f"{name} HTTP statistics count inferences")
        gst = g.get_inference_statistics(name, variants[0]).model_stats
        check(len(gst) == 1 and gst[0].version == variants[0] and gst[0].inference_stats.success.count >= 3,
              f"{name} gRPC statistics for one version")

        # ---- errors, both protocols --------------------------------------------------------
        wrong_dt = "FP64" if inp["datatype"] != "FP64" else "FP32"
        bad = httpclient.InferInput(inp["name"], [1] + inp["shape"][1:], wrong_dt)
        bad.set_data_from_numpy(x[:1].astype(NP[wrong_dt]))
        expect_error(lambda: h.infer(name, [bad]), f"{name} HTTP wrong datatype", "400", f"must be {inp['datatype']}")
        gbad = grpcclient.InferInput(inp["name"], [1] + inp["shape"][1:], wrong_dt)
        gbad.set_data_from_numpy(x[:1].astype(NP[wrong_dt]))
        expect_error(lambda: g.infer(name, [gbad]), f"{name} gRPC wrong datatype", "INVALID_ARGUMENT", "must be")
        flat = x[:1].reshape(1, -1)
        if flat.shape[1:] != tuple(inp["shape"][1:]):
            bad = httpclient.InferInput(inp["name"], list(flat.shape), inp["datatype"])
            bad.set_data_from_numpy(flat)
            expect_error(lambda: h.infer(name, [bad]), f"{name} HTTP wrong shape", "400", "must have shape")
            gbad = grpcclient.InferInput(inp["name"], list(flat.shape), inp["datatype"])
            gbad.set_data_from_numpy(flat)
            expect_error(lambda: g.infer(name, [gbad]), f"{name} gRPC wrong shape", "INVALID_ARGUMENT", "must have shape")
        other = httpclient.InferInput("nope", [1] + inp["shape"][1:], inp["datatype"])
        other.set_data_from_numpy(x[:1])
        expect_error(lambda: h.infer(name, [other]), f"{name} HTTP unknown input", "400", "has no input 'nope'")
        expect_error(lambda: h.infer(name, [i], model_version="nope"), f"{name} HTTP unknown version", "404", "no version")
        expect_error(lambda: g.infer(name, [gi], model_version="nope"), f"{name} gRPC unknown version", "NOT_FOUND")
        expect_error(lambda: h.infer(name, [i], outputs=[httpclient.InferRequestedOutput("nope")]),
                     f"{name} HTTP unknown output", "400", "no output")

    expect_error(lambda: h.get_model_metadata("no_such_model"), "HTTP unknown model", "404", "unknown model")
    expect_error(lambda: g.get_model_metadata("no_such_model"), "gRPC unknown model", "NOT_FOUND", "unknown model")
    expect_error(lambda: h.get_model_config("no_such_model"), "HTTP config of unknown model", "404")

    # Raw HTTP error cases that the client library would not produce.
    base = args.http
    cases = [
        ("malformed JSON", b"{not json", {}, 400, "not a valid inference request"),
        ("element count", json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": [1.0, 2.0]}]}).encode(),
         {}, 400, "needs 64 elements"),
        ("byte size overflow", json.dumps({"inputs": [{"name": "image", "shape": [4611686018427387904, 8, 8], "datatype": "FP32",
                                                         "parameters": {"binary_data_size": 8}}]}).encode(), {}, 413, "overflows"),
        ("negative dimension", json.dumps({"inputs": [{"name": "image", "shape": [-1, 8, 8], "datatype": "FP32", "data": []}]}).encode(),
         {}, 400, "negative"),
        ("header length beyond body", b"{}", {"Inference-Header-Content-Length": "99"}, 400, "only 2 bytes"),
        ("binary size mismatch", json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32",
                                                         "parameters": {"binary_data_size": 12}}]}).encode() + b"x" * 12,
         None, 400, "needs 256 bytes"),
        ("unsupported datatype", json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "BF16",
                                                          "parameters": {"binary_data_size": 128}}]}).encode() + b"x" * 128,
         None, 400, "not supported"),
        ("FP16 to an FP32 model", json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP16",
                                                           "parameters": {"binary_data_size": 128}}]}).encode() + b"x" * 128,
         None, 400, "must be FP32, got FP16"),
        ("bad deadline parameter", json.dumps({"parameters": {"deadline_ms": "soon"}, "inputs": [
            {"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}).encode(), {}, 400, "deadline_ms"),
        ("impossible deadline", json.dumps({"parameters": {"timeout": 1}, "inputs": [
            {"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}).encode(), {}, 504, "cannot meet"),
    ]
    for what, body, headers, status, needle in cases:
        if headers is None:
            header_len = body.index(b"}]}") + 3
            headers = {"Inference-Header-Content-Length": str(header_len)}
        code, text = http_raw(base, "/v2/models/digits/infer", body, headers)
        try:
            err = json.loads(text)["error"]
        except Exception:
            err = text.decode(errors="replace")
        check(code == status and needle.lower() in err.lower(), f"HTTP {what}: got {code} {err}")
    code, text = http_raw(base, "/v2/models/digits/infer", b"x" * (args.max_body + 1), {})
    check(code == 413 and b"max_body_bytes" in text, f"HTTP oversized body: {code} {text[:200]}")
    code, text = http_raw(base, "/nothing/here", method="GET")
    check(code == 404 and b"error" in text, f"unknown route: {code}")
    big = np.zeros([1, args.max_body // 4 + 16], np.float32)
    gbig = grpcclient.InferInput("image", list(big.shape), "FP32")
    gbig.set_data_from_numpy(big)
    # tonic refuses a message over the limit while decoding it, with OUT_OF_RANGE.
    try:
        g.infer("digits", [gbig])
        check(False, "gRPC oversized message: expected an error")
    except InferenceServerException as e:
        check(e.status() in ("StatusCode.OUT_OF_RANGE", "StatusCode.RESOURCE_EXHAUSTED") and "too large" in e.message(),
              f"gRPC oversized message: {e.status()} {e.message()}")

    # The server is still healthy after all of that.
    check(h.is_server_ready() and g.is_server_ready(), "healthy after the error cases")
    code, text = http_raw(base, "/metrics", method="GET")
    check(code == 200 and b"osprey_requests_total" in text and b"osprey_compute_infer_duration_seconds" in text
          and b"osprey_pending_requests" in text, "Prometheus metrics exposed")

    finish()


if __name__ == "__main__":
    main()
