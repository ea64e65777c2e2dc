#!/usr/bin/env python3
"""A split model (layer ranges across agents) through the official clients, unchanged.

Sentences go in as BYTES: over HTTP in Triton's binary form (what tritonclient sends by default)
and as JSON strings, over gRPC as raw contents. The three answers agree exactly, embeddings are
unit vectors, a paraphrase is closer than an unrelated sentence, metadata names the BYTES input,
and a request of the wrong datatype is refused with a message, not answered.

Usage: split.py --http HOST:PORT --grpc HOST:PORT [--model minilm]
"""

import argparse

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from checks import check, finish

SENTENCES = [
    "Smoke was detected near the electrical cabinet.",
    "There is smoke by the power cabinet.",
    "The quality check rejected nine bottles.",
    "Température élevée dans la chambre froide — vérifier le compresseur.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--model", default="minilm")
    a = ap.parse_args()
    h = httpclient.InferenceServerClient(a.http)
    g = grpcclient.InferenceServerClient(a.grpc)
    m = a.model
    check(h.is_model_ready(m), "ready over HTTP")
    check(g.is_model_ready(m), "ready over gRPC")
    meta = h.get_model_metadata(m)
    check(meta["inputs"][0]["datatype"] == "BYTES" and meta["inputs"][0]["name"] == "text", f"metadata {meta}")
    gmeta = g.get_model_metadata(m)
    check(gmeta.outputs[0].datatype == "FP32" and list(gmeta.outputs[0].shape) == [-1, 384], f"{gmeta}")

    text = np.array([s.encode() for s in SENTENCES], dtype=np.object_)
    outs = {}
    for binary in (True, False):
        inp = httpclient.InferInput("text", [len(SENTENCES)], "BYTES")
        inp.set_data_from_numpy(text, binary_data=binary)
        r = h.infer(m, [inp], outputs=[httpclient.InferRequestedOutput("embedding", binary_data=binary)])
        outs["http-binary" if binary else "http-json"] = r.as_numpy("embedding")
    inp = grpcclient.InferInput("text", [len(SENTENCES)], "BYTES")
    inp.set_data_from_numpy(text)
    r = g.infer(m, [inp])
    outs["grpc"] = r.as_numpy("embedding")
    ref = outs["grpc"]
    check(ref is not None and ref.shape == (len(SENTENCES), 384), f"shape {None if ref is None else ref.shape}")
    for k, v in outs.items():
        check(v is not None and np.array_equal(v, ref), f"{k} equals gRPC exactly")
    norms = np.linalg.norm(ref, axis=1)
    check(np.allclose(norms, 1.0, atol=1e-4), f"unit vectors: {norms}")
    sim = ref @ ref.T
    check(sim[0, 1] > sim[0, 2] + 0.2, f"paraphrase closer than unrelated: {sim[0, 1]:.3f} vs {sim[0, 2]:.3f}")

    bad = httpclient.InferInput("text", [1], "INT32")
    bad.set_data_from_numpy(np.array([1], dtype=np.int32))
    try:
        h.infer(m, [bad])
        check(False, "an INT32 input is refused")
    except InferenceServerException as e:
        check("BYTES" in str(e), f"the refusal names the expected datatype: {e}")
    finish(f" on {m}")


if __name__ == "__main__":
    main()
