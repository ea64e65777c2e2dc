"""Ray Serve deployment of models/digits/medium.onnx on onnxruntime (one intra-op thread),
answering the V2 JSON request body at the same path as the other servers (Ray Serve does not
speak the protocol itself). Ray is started on 127.0.0.1 with no dashboard, so all its traffic
stays on loopback. Usage: ray_app.py ONNX PORT   (prints "ready" once it serves)"""
import sys, time
import numpy as np, onnxruntime as ort, ray
from ray import serve
from starlette.requests import Request

onnx_path, port = sys.argv[1], int(sys.argv[2])


@serve.deployment
class Digits:
    def __init__(self, path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    async def __call__(self, req: Request):
        body = await req.json()
        inp = body["inputs"][0]
        x = np.asarray(inp["data"], np.float32).reshape(inp["shape"])
        (p,) = self.session.run(None, {inp["name"]: x})
        return {"model_name": "digits", "outputs": [{"name": "probabilities", "datatype": "FP32",
                                                     "shape": list(p.shape), "data": p.ravel().tolist()}]}


ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": port})
serve.run(Digits.bind(onnx_path), route_prefix="/v2/models/digits/infer")
print("ready", flush=True)
while True:
    time.sleep(3600)
