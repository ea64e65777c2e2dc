"""Builds the scikit-learn original of models/digits/medium.onnx for MLServer: an
MLPClassifier(128) holding exactly the ONNX file's weights (read from its initializers), behind
a reshape from the V2 request's [N, 8, 8] to sklearn's [N, 64]. Checks that its probabilities
equal onnxruntime's on the held-out set before saving, so that all three servers serve one
model. Usage: sklearn_model.py ONNX EVAL_INPUTS OUT_DIR"""
import json, sys
import joblib, numpy as np, onnx, onnxruntime as ort
from onnx import numpy_helper
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, LabelBinarizer

onnx_path, eval_path, out = sys.argv[1:4]
m = onnx.load(onnx_path)
inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
weights, layers = None, []
for node in m.graph.node:
    if node.op_type == "MatMul":
        weights = inits[node.input[1]]
    elif node.op_type == "Add" and weights is not None:
        layers.append((weights, inits[node.input[1]]))
        weights = None
assert [w.shape for w, _ in layers] == [(64, 128), (128, 10)], [w.shape for w, _ in layers]

clf = MLPClassifier(hidden_layer_sizes=(128,), activation="relu")
clf.coefs_ = [w.astype(np.float64) for w, _ in layers]
clf.intercepts_ = [b.astype(np.float64) for _, b in layers]
clf.n_layers_, clf.n_outputs_, clf.out_activation_ = 3, 10, "softmax"
clf.classes_ = np.arange(10)
clf.n_features_in_ = 64
clf._label_binarizer = LabelBinarizer().fit(clf.classes_)
major, minor = (int(p) for p in np.__version__.split(".")[:2])
kw = {"shape": (-1, 64)} if (major, minor) >= (2, 1) else {"newshape": (-1, 64)}
model = make_pipeline(FunctionTransformer(np.reshape, kw_args=kw), clf)

x = np.fromfile(eval_path, dtype="<f4").reshape(-1, 8, 8)
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
ref = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
diff = float(np.abs(model.predict_proba(x) - ref).max())
assert diff < 1e-4, f"sklearn and onnxruntime disagree by {diff}"
joblib.dump(model, f"{out}/model.joblib")
with open(f"{out}/model-settings.json", "w") as f:
    json.dump({"name": "digits", "implementation": "mlserver_sklearn.SKLearnModel",
               "parameters": {"uri": "./model.joblib"}}, f)
print(f"sklearn MLP saved; max |p_sklearn - p_onnxruntime| on {len(x)} held-out images = {diff:.2e}")
