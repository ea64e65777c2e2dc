#!/usr/bin/env python3
"""Builds the ONNX test fixtures in tests/fixtures/ (committed; CI does not run this).

- sklearn_mlp.onnx: a scikit-learn MLP on scikit-learn's bundled digits, exported by
  skl2onnx as shipped (zipmap off): input `X` FP32 [N, 64]; outputs `label` INT64 [N]
  and `probabilities` FP32 [N, 10]. tract types its `label` symbolically (TDim); the engine
  must cast it to the declared INT64.

Needs scikit-learn and skl2onnx (pip install scikit-learn skl2onnx).
"""
import os

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
os.makedirs(out, exist_ok=True)
x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0).fit(x[:1200], y[:1200])
onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, initial_types=None, target_opset=15)
with open(os.path.join(out, "sklearn_mlp.onnx"), "wb") as f:
    f.write(onx.SerializeToString())
# Eight held-out rows (raw little-endian FP32) and scikit-learn's own labels for them.
x[1200:1208].astype("<f4").tofile(os.path.join(out, "sklearn_mlp_inputs.bin"))
with open(os.path.join(out, "sklearn_mlp_labels.txt"), "w") as f:
    f.write(" ".join(str(v) for v in clf.predict(x[1200:1208])) + "\n")
print("inputs", [(i.name, i.type.tensor_type.elem_type) for i in onx.graph.input])
print("outputs", [(o.name, o.type.tensor_type.elem_type) for o in onx.graph.output])
print("sklearn labels", clf.predict(x[1200:1208]).tolist())
