#!/usr/bin/env python3
"""Triton's model-control API driven by tritonclient, unchanged, over HTTP and gRPC.

The server runs with --model-control-mode explicit and --load-model MODEL (the other model,
OTHER, is in the repository but not loaded). Checks: the repository index lists MODEL ready and
OTHER unavailable ("unloaded"); OTHER loads (HTTP) and answers over both protocols; MODEL
reloads three times (gRPC) while it serves; OTHER unloads (HTTP) and then is not served; a
model that is not in the repository is refused with its name.

Usage: model_control.py --http HOST:PORT --grpc HOST:PORT --model M --other O
"""

import argparse

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from checks import check, finish


def states(client):
    return {(m["name"], m.get("version", "")): (m["state"], m.get("reason", "")) for m in client.get_model_repository_index()}


def infer_ok(http, grpc, model):
    x = np.zeros((2, 8, 8), dtype=np.float32)
    hi = httpclient.InferInput("image", list(x.shape), "FP32")
    hi.set_data_from_numpy(x)
    gi = grpcclient.InferInput("image", list(x.shape), "FP32")
    gi.set_data_from_numpy(x)
    a = http.infer(model, [hi]).as_numpy("probabilities")
    b = grpc.infer(model, [gi]).as_numpy("probabilities")
    return a is not None and b is not None and a.shape == (2, 10) and b.shape == (2, 10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--other", required=True)
    args = ap.parse_args()
    http = httpclient.InferenceServerClient(args.http)
    grpc = grpcclient.InferenceServerClient(args.grpc)

    index = states(http)
    check(any(n == args.model and s == "READY" for (n, _), (s, _) in index.items()), f"{args.model} READY in {index}")
    check(index.get((args.other, "")) == ("UNAVAILABLE", "unloaded"), f"{args.other} unloaded in {index}")
    check(not http.is_model_ready(args.other), f"{args.other} is not ready before its load")

    http.load_model(args.other)
    check(http.is_model_ready(args.other) and grpc.is_model_ready(args.other), f"{args.other} ready after load")
    check(infer_ok(http, grpc, args.other), f"{args.other} answers over HTTP and gRPC")
    g_index = {m.name: m.state for m in grpc.get_model_repository_index().models}
    check(g_index.get(args.other) == "READY", f"gRPC index after load: {g_index}")

    for _ in range(3):
        grpc.load_model(args.model)
        check(grpc.is_model_ready(args.model), f"{args.model} ready after a reload")
    check(infer_ok(http, grpc, args.model), f"{args.model} answers after three reloads")

    http.unload_model(args.other)
    check(not http.is_model_ready(args.other), f"{args.other} not ready after unload")
    check(states(http).get((args.other, "")) == ("UNAVAILABLE", "unloaded"), "unloaded in the index again")
    try:
        infer_ok(http, grpc, args.other)
        check(False, f"{args.other} answered after its unload")
    except InferenceServerException as e:
        check("unknown model" in str(e), f"an unloaded model is unknown: {e}")

    for client, proto in ((http, "http"), (grpc, "grpc")):
        try:
            client.load_model("no_such_model")
            check(False, f"{proto}: loading a model that is not in the repository succeeded")
        except InferenceServerException as e:
            check("no_such_model" in str(e), f"{proto}: the refusal names the model: {e}")
    finish(" (model control)")


if __name__ == "__main__":
    main()
