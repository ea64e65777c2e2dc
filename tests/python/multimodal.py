#!/usr/bin/env python3
"""A multi-modal model of the repository served as one model, checked with the official clients.

Over HTTP and gRPC: its metadata lists every modality's inputs and the fused output; it is ready;
a request with one modality is answered by that modality only, and with one call its output is
exactly what the member model gives for the same variant; a request with both modalities and a
target no single answer reaches is refined, the response names both answers (`ensemble`), and
its output is the normalised product of the members' answers called one by one by the client
with the same variants (the fusion rule, end to end); a batch of four events works; malformed
requests are refused with a message.

The server must run with a tenant objective that allows at least two calls and the `product`
fusion (crates/osprey/tests/multimodal.rs writes it).

Usage: multimodal.py --http HOST:PORT --grpc HOST:PORT --models DIR [--model digit_events]
"""

import argparse
import os
import tomllib

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from checks import check, finish, load_model


def params_of(proto, resp):
    if proto == "http":
        return resp.get("parameters", {})
    out = {}
    for k, v in resp.parameters.items():
        which = v.WhichOneof("parameter_choice")
        out[k] = getattr(v, which)
    return out


def ensemble_of(text):
    """`modality=model/variant@node,...` -> [(modality, model, variant)]"""
    out = []
    for part in text.split(","):
        modality, rest = part.split("=", 1)
        model, rest = rest.split("/", 1)
        variant, _node = rest.split("@", 1)
        out.append((modality, model, variant))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--model", default="digit_events")
    a = ap.parse_args()
    with open(os.path.join(a.models, a.model, "multimodal.toml"), "rb") as f:
        spec = tomllib.load(f)
    members = {m["name"]: m["model"] for m in spec["modalities"]}
    data = {}
    for modality, model in members.items():
        mspec, x, rows = load_model(a.models, model)
        data[modality] = (mspec, x, [int(r["label"]) for r in rows])
    # Events: an image and a clip of the same class (the first of each class in both sets).
    img_spec, img_x, img_y = data["image"]
    aud_spec, aud_x, aud_y = data["audio"]
    events = []
    for c in range(10):
        if c in img_y and c in aud_y:
            events.append((img_y.index(c), aud_y.index(c), c))
    check(len(events) == 10, f"an event per class: {len(events)}")

    def inputs(mod, modalities, ev):
        out = []
        for m in modalities:
            s, x, _ = data[m]
            t = s["inputs"][0]
            rows = x[[e[0 if m == "image" else 1] for e in ev]]
            i = mod.InferInput(t["name"], list(rows.shape), t["datatype"])
            i.set_data_from_numpy(rows)
            out.append(i)
        return out

    def member_answer(c, mod, modality, model, variant, ev):
        s, _, _ = data[modality]
        return c.infer(model, inputs(mod, [modality], ev), model_version=variant).as_numpy("probabilities")

    for proto, mod, url in (("http", httpclient, a.http), ("grpc", grpcclient, a.grpc)):
        c = mod.InferenceServerClient(url=url)
        check(c.is_model_ready(a.model), f"{proto}: {a.model} ready")
        md = c.get_model_metadata(a.model)
        if proto == "grpc":
            names_in = [t.name for t in md.inputs]
            names_out = [t.name for t in md.outputs]
            platform = md.platform
        else:
            names_in = [t["name"] for t in md["inputs"]]
            names_out = [t["name"] for t in md["outputs"]]
            platform = md["platform"]
        check(names_in == ["image", "waveform"], f"{proto}: metadata inputs {names_in}")
        check(names_out == ["probabilities", "explanation"], f"{proto}: metadata outputs {names_out}")
        check(platform == "osprey_multimodal", f"{proto}: platform {platform}")

        # One modality, one call: the member's own answer.
        for modality in ("image", "audio"):
            ev = events[:1]
            r = c.infer(a.model, inputs(mod, [modality], ev), parameters={"max_ensemble": 1})
            p = params_of(proto, r.get_response())
            y = r.as_numpy("probabilities")
            check(y is not None and y.shape == (1, 10), f"{proto}: {modality} output shape")
            check(p.get("modalities") == modality, f"{proto}: {modality} only answered by {p.get('modalities')}")
            check(p.get("calls") == 1 and p.get("refined") is False, f"{proto}: one call, not refined: {p}")
            ens = ensemble_of(p.get("ensemble", "x=y/z@w"))
            check(len(ens) == 1 and ens[0][0] == modality, f"{proto}: ensemble {ens}")
            if y is not None and len(ens) == 1:
                want = member_answer(c, mod, *ens[0], ev)
                err = float(np.abs(want - y).max())
                check(err <= 1e-6, f"{proto}: one answer fused is that answer (differs by {err})")

        # Both modalities, a target no single answer reaches: refined, fused by the product rule.
        refined = 0
        for ev in events[:4]:
            r = c.infer(a.model, inputs(mod, ["image", "audio"], [ev]),
                        parameters={"min_confidence": 1.0, "max_ensemble": 2})
            p = params_of(proto, r.get_response())
            y = r.as_numpy("probabilities")
            ens = ensemble_of(p.get("ensemble", "x=y/z@w"))
            check(p.get("calls") == 2 or p.get("refinement_stop") == "target_met",
                  f"{proto}: two calls unless the first is certain: {p}")
            if len(ens) < 2:
                continue
            refined += 1
            check(p.get("refined") is True, f"{proto}: refined flag {p}")
            check(p.get("fusion") == "product", f"{proto}: fusion {p.get('fusion')}")
            answers = [member_answer(c, mod, m, model, v, [ev]) for m, model, v in ens]
            prod = np.prod(np.maximum(np.stack(answers).astype(np.float64), 1e-12), axis=0)
            prod = prod / prod.sum(axis=1, keepdims=True)
            err = float(np.abs(prod - y).max())
            check(err <= 1e-5, f"{proto}: fused output is the product of the answers (differs by {err})")
            conf = float(y.max())
            check(abs(conf - float(p.get("fused_confidence", -1))) <= 1e-6,
                  f"{proto}: fused_confidence {p.get('fused_confidence')} vs output max {conf}")
        check(refined >= 2, f"{proto}: refinement happened on {refined} of 4 events")

        # A batch of four events with both modalities.
        r = c.infer(a.model, inputs(mod, ["image", "audio"], events[:4]))
        y = r.as_numpy("probabilities")
        check(y is not None and y.shape == (4, 10), f"{proto}: batch output shape {None if y is None else y.shape}")
        if y is not None:
            check(np.allclose(y.sum(axis=1), 1.0, atol=1e-4), f"{proto}: fused rows are distributions")

        # An explanation: occlusion of 2x2-pixel patches, by the service that answered first;
        # the client masks the patches itself, calls that variant, and gets the same figures.
        ev = events[:1]
        r = c.infer(a.model, inputs(mod, ["image"], ev), parameters={"explain": True, "max_ensemble": 1})
        p = params_of(proto, r.get_response())
        y = r.as_numpy("probabilities")
        e = r.as_numpy("explanation")
        check(e is not None and e.shape == (1, 16), f"{proto}: explanation shape {None if e is None else e.shape}")
        by = p.get("explained", "")
        check(by.startswith("image=digits/"), f"{proto}: explained by {by!r} ({p})")
        if e is not None and by.startswith("image=digits/"):
            variant = by.split("/", 1)[1]
            x = img_x[[ev[0][0]]]
            cls = int(y.argmax())
            masked = np.repeat(x, 16, axis=0)
            for k in range(16):
                r0, c0 = (k // 4) * 2, (k % 4) * 2
                masked[k, r0:r0 + 2, c0:c0 + 2] = 0.0
            mi = mod.InferInput("image", list(masked.shape), "FP32")
            mi.set_data_from_numpy(masked)
            pm = c.infer("digits", [mi], model_version=variant).as_numpy("probabilities")
            base = member_answer(c, mod, "image", "digits", variant, ev)
            want = base[0, cls] - pm[:, cls]
            err = float(np.abs(want - e[0]).max())
            check(err <= 1e-5, f"{proto}: explanation equals the client's own occlusion (differs by {err})")

        # Refusals.
        bad = mod.InferInput("pixels", [1, 8, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 8, 8), np.float32))
        for what, call in (
            ("an unknown input", lambda: c.infer(a.model, [bad])),
            ("a version", lambda: c.infer(a.model, inputs(mod, ["image"], events[:1]), model_version="small")),
            ("max_ensemble 0", lambda: c.infer(a.model, inputs(mod, ["image"], events[:1]),
                                               parameters={"max_ensemble": 0})),
        ):
            try:
                call()
                check(False, f"{proto}: {what} must be refused")
            except InferenceServerException as e:
                check(len(e.message() or "") > 10, f"{proto}: {what} refused with a message: {e.message()}")
    finish(f" on {a.model}")


if __name__ == "__main__":
    main()
