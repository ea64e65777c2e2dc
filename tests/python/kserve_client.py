#!/usr/bin/env python3
"""The KServe Python SDK against a running Osprey, used as its documentation shows.

InferenceRESTClient (v2 protocol) and InferenceGRPCClient: server liveness and readiness,
model readiness (a served model and an unknown one), and inference on the image model over
both protocols (REST: binary and JSON tensors, the variant the scheduler chose; gRPC: every
variant pinned), whose answers must equal the evaluation set's recorded predictions of the
variant that answered. The REST health calls read the `{"live": true}` / `{"ready": true}` bodies.

Usage: kserve_client.py --http HOST:PORT --grpc HOST:PORT --models DIR
"""

import argparse
import asyncio
import sys

import numpy as np

from checks import check, finish, load_model

# kserve parses the process's command line when imported (its model server's flags), and
# refuses ours: read ours first, then import it with an empty command line.
_ap = argparse.ArgumentParser()
_ap.add_argument("--http", required=True)
_ap.add_argument("--grpc", required=True)
_ap.add_argument("--models", required=True)
ARGS = _ap.parse_args()
sys.argv = sys.argv[:1]
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig  # noqa: E402

MODEL = "digits"


async def rest_checks(base, x, rows, variants):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        check(await client.is_server_live(base) is True, "REST is_server_live")
        check(await client.is_server_ready(base) is True, "REST is_server_ready")
        check(await client.is_model_ready(base, MODEL) is True, "REST is_model_ready(digits)")
        check(await client.is_model_ready(base, "no_such_model") is False, "REST is_model_ready(unknown) is False")
        # The SDK's REST path is always /v2/models/{name}/infer (it does not send a version),
        # so the scheduler chooses the variant; the answer must be that variant's, which the
        # response names (model_version and the `variant` parameter).
        for start in range(0, 32, 4):
            batch = x[start:start + 4]
            # Binary tensors (what set_data_from_numpy does by default) and JSON lists.
            for binary in (True, False):
                inp = InferInput("image", list(batch.shape), "FP32")
                inp.set_data_from_numpy(batch, binary_data=binary)
                req = InferRequest(model_name=MODEL, infer_inputs=[inp], request_id=f"rest-{start}-{binary}")
                res = await client.infer(base, req, model_name=MODEL)
                # The binary-response path of the SDK drops model_version; the parameters stay.
                variant = res.model_version or (res.parameters or {}).get("variant")
                check(variant in variants, f"REST answered by variant {variant!r}")
                if variant not in variants:
                    continue
                got = [int(p) for p in res.outputs[0].as_numpy().reshape(len(batch), -1).argmax(axis=1)]
                want = [int(r[f"{variant}_pred"]) for r in rows[start:start + 4]]
                check(got == want, f"REST rows {start}.. on {variant} binary={binary}: {got} != {want}")
    finally:
        await client.close()


async def grpc_checks(target, x, rows, variants):
    client = InferenceGRPCClient(target, timeout=30)
    try:
        check(await client.is_server_live() is True, "gRPC is_server_live")
        check(await client.is_server_ready() is True, "gRPC is_server_ready")
        check(await client.is_model_ready(MODEL) is True, "gRPC is_model_ready(digits)")
        batch = x[4:8]
        for variant in variants:
            inp = InferInput("image", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            req = InferRequest(model_name=MODEL, infer_inputs=[inp], model_version=variant,
                               request_id=f"grpc-{variant}")
            res = await client.infer(req)
            check(res.model_version == variant, f"gRPC pinned {variant}, answered by {res.model_version}")
            got = [int(p) for p in res.outputs[0].as_numpy().reshape(len(batch), -1).argmax(axis=1)]
            want = [int(r[f"{variant}_pred"]) for r in rows[4:8]]
            check(got == want, f"gRPC {variant}: {got} != {want}")
    finally:
        await client.close()


def main():
    a = ARGS
    spec, x, rows = load_model(a.models, MODEL)
    variants = [v["name"] for v in spec["variants"]]
    x = np.ascontiguousarray(x, dtype=np.float32)
    asyncio.run(rest_checks(f"http://{a.http}", x, rows, variants))
    asyncio.run(grpc_checks(a.grpc, x, rows, variants))
    finish(" (kserve)")


if __name__ == "__main__":
    main()
