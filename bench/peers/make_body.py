"""Writes the request bodies bench/peers.sh sends: one held-out digits image (the first sample
of models/digits/eval/inputs.bin, FP32 [1, 8, 8]) as a V2 JSON body, and the same request in
Triton's binary form (JSON header + raw bytes; its header length goes to stdout)."""
import json, struct, sys

repo, out = sys.argv[1], sys.argv[2]
raw = open(f"{repo}/digits/eval/inputs.bin", "rb").read(64 * 4)
values = [round(v, 6) for v in struct.unpack("<64f", raw)]
tensor = {"name": "image", "shape": [1, 8, 8], "datatype": "FP32"}
with open(f"{out}/body.json", "w") as f:
    json.dump({"inputs": [dict(tensor, data=values)]}, f)
header = json.dumps({"inputs": [dict(tensor, parameters={"binary_data_size": 256})],
                     "parameters": {"binary_data_output": True}}).encode()
with open(f"{out}/body.bin", "wb") as f:
    f.write(header + struct.pack("<64f", *values))
print(len(header))

# The bundled audio model's request in binary form (one held-out clip, INT16 [1, 6400]), for
# batching under load (bench/batching.sh); its header length goes to body-spoken.hl.
clip = open(f"{repo}/spoken_digits/eval/inputs.bin", "rb").read(6400 * 2)
header = json.dumps({"inputs": [{"name": "waveform", "shape": [1, 6400], "datatype": "INT16",
                                 "parameters": {"binary_data_size": len(clip)}}],
                     "parameters": {"binary_data_output": True}}).encode()
with open(f"{out}/body-spoken.bin", "wb") as f:
    f.write(header + clip)
with open(f"{out}/body-spoken.hl", "w") as f:
    f.write(str(len(header)))
