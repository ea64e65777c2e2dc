#!/usr/bin/env python3
"""Bad input, as an outside tester would send it, against a running Osprey.

Hundreds of malformed requests over HTTP (raw sockets, so that framing itself can be wrong)
and gRPC (the official stubs, plus raw undecodable bytes): shapes, datatypes, sizes, framing,
names, path traversal, encodings, options and authentication. Each must get the expected 4xx
status (or gRPC code) and a JSON error message; after all of them the server must still be
healthy, answer a valid request, and hold no pending request.

Usage: malformed.py --http HOST:PORT --grpc HOST:PORT --key KEY --limited-key KEY --monitor-key KEY
  KEY: a tenant allowed every model; limited: only spoken_digits; monitor: the monitor role.
Prints "N malformed requests refused correctly" and exits 0 when every case passes.
"""

import argparse
import json
import socket
import sys
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

FAILURES = []
CASES = 0


def fail(what):
    FAILURES.append(what)
    print(f"FAIL: {what}", flush=True)


def raw_http(addr, data, timeout=10):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                c = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not c:
                break
            out += c
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                cl = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if cl and len(body) >= int(cl[0].split(b":")[1]):
                    break
    finally:
        s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, body


def request(method, path, body=b"", headers=None, key=None, content_type="application/json", extra=b""):
    h = {"Host": "x", "Connection": "close"}
    if content_type is not None:
        h["Content-Type"] = content_type
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    if "Content-Length" not in h and method in ("POST", "PUT"):
        h["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + extra + body


def expect_http(addr, name, data, statuses, needle=None, json_body=True):
    global CASES
    CASES += 1
    try:
        status, body = raw_http(addr, data)
    except OSError as e:
        fail(f"{name}: connection failed: {e}")
        return
    if isinstance(statuses, int):
        statuses = (statuses,)
    if status not in statuses:
        fail(f"{name}: expected {statuses}, got {status}: {body[:200]!r}")
        return
    if json_body:
        try:
            msg = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            fail(f"{name}: expected a JSON error body, got {body[:200]!r}")
            return
        if not msg:
            fail(f"{name}: empty error message")
        elif needle and needle.lower() not in msg.lower():
            fail(f"{name}: expected '{needle}' in {msg!r}")


def infer_body(name="image", shape=(1, 8, 8), datatype="FP32", data=None, **extra):
    if data is None:
        n = int(np.prod(shape)) if all(isinstance(d, int) and d >= 0 for d in shape) else 1
        data = [0.5] * min(n, 10000)
    inp = {"name": name, "shape": list(shape), "datatype": datatype, "data": data}
    body = {"inputs": [inp]}
    body.update(extra)
    return json.dumps(body).encode()


def http_cases(a, key, limited, monitor):
    digits = "/v2/models/digits/infer"
    audio = "/v2/models/spoken_digits/infer"
    P = lambda body, **kw: request("POST", digits, body, key=key, **kw)  # noqa: E731

    # --- shapes ---
    for shape in [(8, 8), (1, 8), (1, 8, 8, 1), (1, 64), (1, 4, 16), (1, 8, 9), (1, 9, 8), (2, 8, 8),
                  (0, 8, 8), (-1, 8, 8), (1, -8, 8), (1, 0, 8), (1 << 40, 8, 8), (1, 1 << 40, 1 << 30),
                  (100000, 8, 8), (1, 8, 8, 8, 8, 8, 8, 8)]:
        expect_http(a, f"shape {shape}", P(infer_body(shape=shape, data=[0.5] * 64)), (400, 413))
    for data in [[0.5] * 63, [0.5] * 65, [], [[0.5] * 65], [[0.5] * 8] * 7, [0.5] * 128, [[0.5] * 32, [0.5] * 33]]:
        expect_http(a, f"{len(data)} elements for [1,8,8]", P(infer_body(data=data)), 400)
    for shape in ["1,8,8", [1.5, 8, 8], ["1", 8, 8], None, [True, 8, 8], [1, 8, None], {"a": 1}]:
        body = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32",
                                       "data": [0.5] * 64}]}).encode()
        expect_http(a, f"shape literal {shape!r}", P(body), 400)

    # --- datatypes ---
    for dt in ["FP16", "BF16", "BYTES", "fp32", "FLOAT", "", "FP32 ", "INT128", "UINT8", "INT64", "BOOL",
               "FP64", "INT16", "INT8", "UINT64", "\u00e9", "FP3\u0000"]:
        expect_http(a, f"datatype {dt!r}", P(infer_body(datatype=dt)), 400)
    for data in [["a"] * 64, [True] * 64, [None] * 64, [{"x": 1}] * 64, [[]] * 64, "0.5", 0.5, {"x": 1}]:
        expect_http(a, f"data {str(data)[:20]}", P(infer_body(data=data)), 400)
    # Values beyond a datatype's range.
    wave = [40000] + [0] * 6399
    expect_http(a, "INT16 out of range", request("POST", audio, infer_body("waveform", (1, 6400), "INT16", wave), key=key), 400)
    expect_http(a, "INT16 fractional", request("POST", audio, infer_body("waveform", (1, 6400), "INT16", [0.5] * 6400), key=key), 400)
    expect_http(a, "INT16 negative overflow", request("POST", audio, infer_body("waveform", (1, 6400), "INT16", [-40000] * 6400), key=key), 400)

    # --- names ---
    for name in ["img", "", "IMAGE", "image ", "probabilities", "../image", "\u0000", "x" * 5000]:
        expect_http(a, f"input name {name[:20]!r}", P(infer_body(name=name)), 400)
    two = json.dumps({"inputs": [json.loads(infer_body())["inputs"][0]] * 2}).encode()
    expect_http(a, "duplicate input", P(two), 400)
    expect_http(a, "no inputs", P(b'{"inputs": []}'), 400)
    expect_http(a, "inputs missing", P(b'{"id": "x"}'), 400)
    for outputs in [[{"name": "nope"}], [{"name": ""}], [{"name": "probabilities", "parameters": {"classification": 3}}],
                    [{"name": "probabilities", "parameters": {"binary_data": "yes"}}], [{}], "probabilities",
                    [{"name": "probabilities"}, {"name": "probabilities"}]]:
        body = json.dumps({"inputs": json.loads(infer_body())["inputs"], "outputs": outputs}).encode()
        expect_http(a, f"outputs {str(outputs)[:40]}", P(body), 400)
    for path in ["/v2/models/nope/infer", "/v2/models/digits/versions/huge/infer", "/v2/models/digits/versions/../infer",
                 "/v2/models/../../etc/passwd/infer", "/v2/models/%2e%2e%2f%2e%2e/infer", "/v2/models/digits%00/infer",
                 "/v2/models/" + "a" * 300 + "/infer", "/v2/models/%ff%fe/infer", "/v2/models/digits/versions//infer",
                 "/v2/models/\u00e9/infer".encode().decode("latin-1")]:
        expect_http(a, f"path {path[:40]}", request("POST", path, infer_body(), key=key), (400, 404))
    for path in ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/config", "/v2/models/nope/stats",
                 "/v2/models/digits/versions/nope", "/v2/models/digits/versions/nope/config", "/nope", "/v1/models/digits",
                 "/v2/../../etc/passwd", "/v2/models/..%2f..%2fetc%2fpasswd", "/etc/passwd", "/v2/models/digits/infer/extra"]:
        expect_http(a, f"GET {path[:40]}", request("GET", path, key=key), (404, 405))

    # --- encodings ---
    for enc in ["gzip", "deflate", "br", "x-unknown"]:
        expect_http(a, f"Content-Encoding {enc}", P(infer_body(), headers={"Content-Encoding": enc}), 400)
    for body in [b"", b"{", b"}", b"[]", b"null", b"42", b'"x"', b"\xff\xfe{}", b"\xef\xbb\xbf" + infer_body(),
                 infer_body() + b"garbage", b'{"inputs": [' * 200 + b"]" * 200 + b"}", b"\x00" * 64,
                 infer_body().replace(b"0.5", b"NaN", 1), infer_body().replace(b"0.5", b"1e999999", 1),
                 infer_body().replace(b"0.5", b"0x10", 1), infer_body().replace(b"0.5", b".5", 1),
                 infer_body().replace(b"0.5", b"'0.5'", 1), b'{"inputs": "image"}', b'{"inputs": [1, 2]}',
                 b'{"inputs": [{"name": "image"}]}', infer_body().replace(b'"FP32"', b"FP32"),
                 b'{"inputs": [{"name": "image", "shape": [1,8,8], "datatype": "FP32", "data": [' + b"0.5," * 63 + b"0.5,]}]}"]:
        expect_http(a, f"body {body[:24]!r}", P(body), 400)

    # --- options ---
    for params in [{"timeout": -1}, {"timeout": "1"}, {"timeout": 1.5}, {"deadline_ms": -5}, {"deadline_ms": "x"},
                   {"priority": -1}, {"priority": "high"}, {"min_accuracy": "high"}, {"binary_data_output": 1},
                   {"binary_data_output": "true"}]:
        expect_http(a, f"parameters {params}", P(infer_body(parameters=params)), 400)
    expect_http(a, "binary_data_size without binary", P(json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8],
                "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}).encode(),
                headers={"Inference-Header-Content-Length": None}), 400)
    hdr = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 256}}]}).encode()
    for tail, hl, what in [(b"\0" * 255, len(hdr), "short binary"), (b"\0" * 257, len(hdr), "long binary"),
                           (b"\0" * 256, len(hdr) + 1000, "header length past the body"),
                           (b"\0" * 256, "abc", "header length not a number"), (b"\0" * 256, -1, "negative header length"),
                           (b"\0" * 256, 5, "header length cuts the JSON")]:
        expect_http(a, what, P(hdr + tail, headers={"Inference-Header-Content-Length": str(hl)},
                               content_type="application/octet-stream"), 400)
    both = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.5] * 64,
                                   "parameters": {"binary_data_size": 256}}]}).encode()
    expect_http(a, "data and binary", P(both + b"\0" * 256, headers={"Inference-Header-Content-Length": str(len(both))}), 400)
    for bad in [{"binary_data_size": -1}, {"binary_data_size": "256"}, {"binary_data_size": 1 << 62}]:
        h2 = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "parameters": bad}]}).encode()
        expect_http(a, f"binary_data_size {bad}", P(h2 + b"\0" * 256, headers={"Inference-Header-Content-Length": str(len(h2))}), 400)

    # --- content types, methods ---
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "image/png", "json"]:
        expect_http(a, f"Content-Type {ct}", P(infer_body(), content_type=ct), 415, "Content-Type")
    for method, path in [("GET", digits), ("PUT", digits), ("DELETE", digits), ("PATCH", digits), ("POST", "/v2/models/digits"),
                         ("DELETE", "/v2"), ("POST", "/v2/health/live"), ("PUT", "/v2/repository/index")]:
        expect_http(a, f"{method} {path}", request(method, path, b"{}" if method in ("POST", "PUT") else b"", key=key), 405)

    # --- sizes and framing ---
    expect_http(a, "Content-Length 10^12", request("POST", digits, b"", headers={"Content-Length": "1000000000000"}, key=key), 413)
    expect_http(a, "Content-Length 2^64", request("POST", digits, b"", headers={"Content-Length": "18446744073709551616"}, key=key), (400, 413), json_body=False)
    expect_http(a, "Content-Length negative", request("POST", digits, b"", headers={"Content-Length": "-5"}, key=key), 400, json_body=False)
    expect_http(a, "Content-Length words", request("POST", digits, b"", headers={"Content-Length": "ten"}, key=key), 400, json_body=False)
    expect_http(a, "two Content-Lengths", request("POST", digits, b"{}", key=key, extra=b"") .replace(b"Content-Length: 2", b"Content-Length: 2\r\nContent-Length: 3"), 400, json_body=False)
    expect_http(a, "CL and TE", request("POST", digits, b"0\r\n\r\n", headers={"Transfer-Encoding": "chunked", "Content-Length": "5"}, key=key), 400)
    expect_http(a, "bad chunk size", request("POST", digits, b"zz\r\n{}\r\n0\r\n\r\n", headers={"Transfer-Encoding": "chunked", "Content-Length": None}, key=key), 400, json_body=False)
    expect_http(a, "TE gzip", request("POST", digits, b"{}", headers={"Transfer-Encoding": "gzip", "Content-Length": None}, key=key), 400, json_body=False)
    expect_http(a, "URI 9 KiB", request("GET", "/v2/models/" + "a" * 9000, key=key), 414)
    expect_http(a, "150 headers", request("GET", "/v2", headers={f"X-H{i}": "v" for i in range(150)}, key=key), 431)
    expect_http(a, "40 KiB header", request("GET", "/v2", headers={"X-Big": "v" * 40000}, key=key), 431)
    for garbage in [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64 + b"\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"POST /v2 HTTP/1.1\r\nHost x\r\n\r\n", b"\r\n\r\n\r\n\r\nGARBAGE / HTTP/1.1\r\nbad header\r\n\r\n",
                    b"GET /v2 HTTP/1.1\r\nHo\x00st: x\r\n\r\n"]:
        expect_http(a, f"garbage {garbage[:16]!r}", garbage, (400, 505), json_body=False)
    expect_http(a, "body over the limit", request("POST", digits, b"x" * ((16 << 20) + 1), key=key), 413)

    # --- auth and roles ---
    for auth in [None, "Bearer", "Bearer ", "Bearer wrong", "Basic " + key, key, "Token " + key, "Bearer " + key + "x"]:
        h = {"Authorization": auth} if auth is not None else {}
        expect_http(a, f"auth {str(auth)[:16]!r}", request("POST", digits, infer_body(), headers=h), 401, "API key")
        expect_http(a, f"auth {str(auth)[:16]!r} metadata", request("GET", "/v2/models/digits", headers=h), 401)
    expect_http(a, "limited tenant on digits", request("POST", digits, infer_body(), key=limited), 403, "may not use")
    expect_http(a, "limited tenant digits metadata", request("GET", "/v2/models/digits", key=limited), 403)
    expect_http(a, "limited tenant digits stats", request("GET", "/v2/models/digits/stats", key=limited), 403)
    expect_http(a, "tenant reads /metrics", request("GET", "/metrics", key=key), 403, "monitor")
    expect_http(a, "tenant reads /v2/cluster", request("GET", "/v2/cluster", key=limited), 403, "monitor")
    for who in [key, limited, monitor]:
        expect_http(a, "non-admin unloads", request("POST", "/v2/cluster/nodes/local-0/unload",
                    b'{"model":"digits","variant":"small"}', key=who), 403, "admin")
    expect_http(a, "monitor infers", request("POST", digits, infer_body(), key=monitor), 403)


def grpc_cases(addr, key):
    global CASES
    ch = grpc.insecure_channel(addr)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    md = [("authorization", f"Bearer {key}")]

    def expect(name, fn, code, needle=None):
        global CASES
        CASES += 1
        codes = code if isinstance(code, tuple) else (code,)
        try:
            fn()
        except grpc.RpcError as e:
            if e.code() not in codes:
                fail(f"grpc {name}: expected {code}, got {e.code()}: {e.details()}")
            elif not e.details():
                fail(f"grpc {name}: empty message")
            elif needle and needle.lower() not in e.details().lower():
                fail(f"grpc {name}: expected '{needle}' in {e.details()!r}")
            return
        fail(f"grpc {name}: expected {code}, got success")

    def req(model="digits", version="", name="image", dt="FP32", shape=(1, 8, 8), raw=None, contents=None, outputs=()):
        r = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        t = r.inputs.add()
        t.name, t.datatype = name, dt
        t.shape.extend(shape)
        if contents is not None:
            t.contents.fp32_contents.extend(contents)
        elif raw is not False:
            r.raw_input_contents.append(raw if raw is not None else np.zeros(64, "<f4").tobytes())
        for o in outputs:
            r.outputs.add().name = o
        return r

    infer = lambda r, m=md: stub.ModelInfer(r, metadata=m, timeout=10)  # noqa: E731
    INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    for shape in [(8, 8), (1, 64), (1, 8, 9), (2, 8, 8), (0, 8, 8), (-1, 8, 8), (1 << 40, 8, 8), (1, 8, 8, 1)]:
        expect(f"shape {shape}", lambda: infer(req(shape=shape)), INV)
    for dt in ["FP16", "BYTES", "fp32", "", "INT64", "UINT8", "FP64", "BF16"]:
        expect(f"datatype {dt!r}", lambda: infer(req(dt=dt)), INV)
    for n in [0, 63, 65, 128, 1000]:
        expect(f"raw {n} bytes", lambda: infer(req(raw=b"\0" * n)), INV)
    expect("contents and raw", lambda: infer(_both(req(contents=[0.5] * 64))), INV)
    expect("contents wrong count", lambda: infer(req(contents=[0.5] * 10)), INV)
    # A shape of 10^18 elements over 64 values (once an allocation abort, found by fuzzing).
    expect("contents huge shape", lambda: infer(req(shape=(1 << 40, 1 << 20), contents=[0.5] * 64)), INV)
    expect("no data", lambda: infer(req(raw=False)), INV)
    for name in ["img", "", "probabilities"]:
        expect(f"input name {name!r}", lambda: infer(req(name=name)), INV)
    for model, version in [("nope", ""), ("digits", "huge"), ("../digits", ""), ("", ""), ("digits\0", "")]:
        expect(f"model {model!r}/{version!r}", lambda: infer(req(model=model, version=version)), NF)
    expect("unknown output", lambda: infer(req(outputs=["nope"])), INV)
    expect("no key", lambda: infer(req(), []), grpc.StatusCode.UNAUTHENTICATED)
    expect("wrong key", lambda: infer(req(), [("authorization", "Bearer wrong")]), grpc.StatusCode.UNAUTHENTICATED)
    expect("metadata no key", lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="digits"), timeout=10),
           grpc.StatusCode.UNAUTHENTICATED)
    expect("metadata unknown", lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), metadata=md,
                                                          timeout=10), NF)
    # Bytes that are not a ModelInferRequest at all.
    raw_call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    for junk in [b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab", b"\x08" + b"\x80" * 11, b"\x0f\x01\x02"]:
        expect(f"undecodable {junk[:6]!r}", lambda: raw_call(junk, metadata=md, timeout=10), INV, "protobuf")
    big = req(raw=b"\0" * (17 << 20))
    # tonic reports an oversized message as OUT_OF_RANGE; grpc-core as RESOURCE_EXHAUSTED.
    expect("message over the limit", lambda: infer(big), (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE))
    # An agent without the join token.
    attach = ch.stream_stream("/osprey.agent.v1.AgentGateway/Attach", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    expect("attach without token", lambda: list(attach(iter([b""]), timeout=10)), grpc.StatusCode.UNAUTHENTICATED, "join token")
    expect("attach wrong token", lambda: list(attach(iter([b""]), metadata=[("osprey-join-token", "x" * 32)], timeout=10)),
           grpc.StatusCode.UNAUTHENTICATED)
    ch.close()


def _both(r):
    r.raw_input_contents.append(b"\0" * 256)
    return r


def healthy(a, key):
    status, _ = raw_http(a, request("GET", "/v2/health/ready"))
    if status != 200:
        fail(f"server not ready after the bad input: {status}")
    status, body = raw_http(a, request("POST", "/v2/models/digits/infer", infer_body(), key=key))
    if status != 200:
        fail(f"valid request after the bad input: {status} {body[:200]!r}")
    deadline = time.time() + 10
    while time.time() < deadline:
        status, body = raw_http(a, request("GET", "/metrics", key=None, headers={"Authorization": f"Bearer {ARGS.monitor_key}"}))
        pending = [l for l in body.decode(errors="replace").splitlines() if l.startswith("osprey_pending_requests")]
        if status == 200 and pending and all(l.endswith(" 0") for l in pending):
            return
        time.sleep(0.05)
    fail(f"requests still pending after the bad input: {pending}")


def main():
    global ARGS
    p = argparse.ArgumentParser()
    for k in ["--http", "--grpc", "--key", "--limited-key", "--monitor-key"]:
        p.add_argument(k, required=True)
    ARGS = p.parse_args()
    http_cases(ARGS.http, ARGS.key, ARGS.limited_key, ARGS.monitor_key)
    n_http = CASES
    grpc_cases(ARGS.grpc, ARGS.key)
    healthy(ARGS.http, ARGS.key)
    if FAILURES:
        print(f"{len(FAILURES)} of {CASES} cases failed", flush=True)
        sys.exit(1)
    print(f"{CASES} malformed requests refused correctly ({n_http} HTTP, {CASES - n_http} gRPC); server healthy after")


if __name__ == "__main__":
    main()
