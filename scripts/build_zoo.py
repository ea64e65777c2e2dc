#!/usr/bin/env python3
"""Build Osprey's bundled model zoo under models/ from data that packages ship.

Two tasks observe the same ten event classes (the digits 0-9) in two modalities, so the zoo can
later serve a multi-modal pair:

* ``digits``        image: scikit-learn's 8x8 handwritten digits, degraded like a cheap camera
                    would (shift, sensor noise, occlusion). Input ``image`` FP32 [-1, 8, 8].
* ``spoken_digits`` audio: the words "zero".."nine" synthesised by espeak-ng in many voices,
                    speeds and pitches, 0.8 s of 8 kHz PCM16, each clip at one of five
                    difficulty grades (a quiet room at 30 dB SNR up to -3 dB with
                    reverberation and another speaker underneath).
                    Input ``waveform`` INT16 [-1, 6400].

Within each task the inputs range from easy to hard (the ``severity`` column of the held-out
set), and the variants' capacity shows on the hard ones: the smallest variant fails many
inputs the largest gets right.

Each task has three variants whose accuracy and cost really differ:

* digits/small   2x2-pooled linear classifier (pooling folded into one 64x10 MatMul)
* digits/medium  MLP 64-128-10
* digits/large   MLP 64-512-512-10 with 25-view test-time augmentation (every 1-2 px shift),
                 so compute is ~7.5 M multiply-adds per image while weights stay ~1 MB
* spoken/small   coarse spectrogram (64-point frames) -> 16 log bands x 4 segments -> linear
* spoken/medium  256-point STFT, hop 128 -> 24 log-mel x 6 segments -> MLP(64)
* spoken/large   512-point STFT, hop 32 -> 40 log-mel x 16 segments -> MLP(512, 256); the
                 high-resolution front end costs ~50 M multiply-adds per clip

Two pipelines of three stages, each stage a model of its own with three variants, where one
stage's output is the next one's input (``--only pipelines``):

* ``digits_pipeline``  degraded image -> digits_denoise -> digits_classify -> digits_calibrate
* ``spoken_pipeline``  PCM16 clip -> spoken_features (log-mel front ends of three resolutions)
                       -> spoken_encode (a 16-d embedding: the large encoder's, the others
                       distilled from it) -> spoken_classify (heads of three sizes)

Each stage's accuracy is measured in context (the other stages at their reference variant),
and ``<pipeline>/eval/end_to_end.csv`` holds every combination's accuracy on the pipeline's
held-out set.

The whole front end (STFT as a strided Conv with Hann-windowed DFT kernels, power, mel
filterbank, log, time pooling, standardisation) is inside the ONNX graph, so clients send raw
pixels or raw PCM. Every graph is checked against the numpy reference with onnxruntime when it
is installed.

Outputs per task: ``models/<task>/<variant>.onnx``, ``models/<task>/model.toml`` (metadata and
profiled accuracy, overall and per class), and a held-out evaluation set:
``models/<task>/eval/inputs.bin`` (the input tensor's raw little-endian bytes, row-major) and
``models/<task>/eval/labels.csv`` (``index,label,<variant>...`` with 1 where that variant was
right on that sample, plus ``<variant>_pred`` and ``severity`` columns), with every variant's
output on every held-out sample in ``models/<task>/eval/probabilities.bin``. The paired
multi-modal set ``models/digit_events/eval/pairs.csv`` matches held-out images and clips of
the same class.

Usage: python3 scripts/build_zoo.py [--out models] [--seed 7]
Needs: numpy, scikit-learn, onnx (onnxruntime optional), and the espeak-ng program.
"""

import argparse
import os
import shutil
import subprocess
import sys
import wave
import io
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPSET = 13
SR = 8000
CLIP = 6400  # 0.8 s


# ----------------------------------------------------------------------------------------------
# ONNX helpers
# ----------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, name):
        self.name = name
        self.nodes = []
        self.inits = []
        self.n = 0

    def const(self, arr, name=None):
        self.n += 1
        name = name or f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type, inputs, **attrs):
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def mlp(self, x, layers):
        """layers: list of (W [in,out], b [out]); ReLU between, none after the last."""
        for i, (w, b) in enumerate(layers):
            x = self.op("MatMul", [x, self.const(w.astype(np.float32))])
            x = self.op("Add", [x, self.const(b.astype(np.float32))])
            if i + 1 < len(layers):
                x = self.op("Relu", [x])
        return x

    def save(self, path, inp, out_tensor, doc, out_name="probabilities", out_dims=(10,)):
        self.nodes.append(helper.make_node("Identity", [out_tensor], [out_name]))
        g = helper.make_graph(
            self.nodes,
            self.name,
            [inp],
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", *out_dims])],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="osprey-build-zoo")
        m.doc_string = doc
        m.ir_version = 8
        onnx.checker.check_model(m)
        onnx.save(m, path)


def mlp_layers(clf):
    return list(zip(clf.coefs_, clf.intercepts_))


def np_mlp(x, layers):
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i + 1 < len(layers):
            x = np.maximum(x, 0)
    return x


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Task 1: digits (image)
# ----------------------------------------------------------------------------------------------
def shift_matrix(dx, dy):
    """64x64 matrix S with (x.flatten() @ S) = image shifted by (dx, dy), zero filled."""
    s = np.zeros((64, 64), np.float32)
    for r in range(8):
        for c in range(8):
            r2, c2 = r + dy, c + dx
            if 0 <= r2 < 8 and 0 <= c2 < 8:
                s[r * 8 + c, r2 * 8 + c2] = 1.0
    return s


def degrade(images, rng):
    """Camera-like degradation with a per-sample severity, so per-sample difficulty varies:
    (images, grades)."""
    out = np.empty_like(images)
    grades = np.zeros(len(images), np.int64)
    for i, im in enumerate(images):
        sev = rng.choice([0, 1, 2, 3], p=[0.3, 0.3, 0.25, 0.15])
        grades[i] = sev
        dx, dy = rng.integers(-1, 2, size=2) if sev >= 1 else (0, 0)
        im = np.roll(np.roll(im, dy, axis=0), dx, axis=1)
        im = im + rng.normal(0, [0.0, 0.08, 0.15, 0.25][sev], size=im.shape)
        if sev >= 2 and rng.random() < 0.4:
            r, c = rng.integers(0, 6, size=2)
            im[r:r + 3, c:c + 3] = 0.0
        out[i] = np.clip(im, -0.5, 1.5)
    return out.astype(np.float32), grades


def build_digits(out_dir, rng):
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target
    idx = rng.permutation(len(y))
    n_eval = 540
    ev, tr = idx[:n_eval], idx[n_eval:]
    # Training data: clean plus several degraded copies; evaluation: one degraded copy.
    xtr = np.concatenate([x[tr]] + [degrade(x[tr], rng)[0] for _ in range(4)])
    ytr = np.concatenate([y[tr]] * 5)
    xev, grades = degrade(x[ev], rng)
    yev = y[ev]
    ftr, fev = xtr.reshape(len(xtr), 64), xev.reshape(len(xev), 64)

    variants = {}
    # small: 2x2 average pooling folded into the linear layer.
    pool = np.zeros((64, 16), np.float32)
    for r in range(8):
        for c in range(8):
            pool[r * 8 + c, (r // 2) * 4 + c // 2] = 0.25
    lr = LogisticRegression(max_iter=2000, C=1.0).fit(ftr @ pool, ytr)
    w_small = pool @ lr.coef_.T.astype(np.float32)
    b_small = lr.intercept_.astype(np.float32)
    variants["small"] = dict(
        probs=softmax(fev @ w_small + b_small),
        build=lambda g, x: g.op("Softmax", [g.mlp(x, [(w_small, b_small)])], axis=1),
        doc="2x2 pooled linear classifier",
    )
    # medium: MLP(128).
    med = MLPClassifier((128,), max_iter=60, random_state=1, early_stopping=False).fit(ftr, ytr)
    med_layers = mlp_layers(med)
    variants["medium"] = dict(
        probs=softmax(np_mlp(fev, med_layers)),
        build=lambda g, x: g.op("Softmax", [g.mlp(x, med_layers)], axis=1),
        doc="MLP 64-128-10",
    )
    # large: MLP(512, 512) with 25-view shift test-time augmentation.
    big = MLPClassifier((512, 512), max_iter=40, random_state=2, early_stopping=False).fit(ftr, ytr)
    big_layers = mlp_layers(big)
    shifts = [(dx, dy) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2)]
    k = len(shifts)
    views = np.concatenate([shift_matrix(dx, dy) for dx, dy in shifts], axis=1)  # 64 x 64k
    # Weight views: the unshifted view counts most, far shifts least.
    vw = np.array([np.exp(-(dx * dx + dy * dy) / 2.0) for dx, dy in shifts], np.float32)
    vw = vw / vw.sum()

    def np_large(f):
        v = (f @ views).reshape(len(f) * k, 64)
        p = softmax(np_mlp(v, big_layers)).reshape(len(f), k, 10)
        return (p * vw[None, :, None]).sum(axis=1)

    def g_large(g, x):
        v = g.op("MatMul", [x, g.const(views)])
        v = g.op("Reshape", [v, g.const(np.array([-1, 64], np.int64))])
        p = g.op("Softmax", [g.mlp(v, big_layers)], axis=1)
        p = g.op("Reshape", [p, g.const(np.array([-1, k, 10], np.int64))])
        p = g.op("Mul", [p, g.const(vw.reshape(1, k, 1))])
        return g.op("ReduceSum", [p, g.const(np.array([1], np.int64))], keepdims=0)

    variants["large"] = dict(probs=np_large(fev), build=g_large,
                             doc="MLP 64-512-512-10 with 25-view shift test-time augmentation")

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8])
    for name, v in variants.items():
        g = Graph(f"digits_{name}")
        x = g.op("Reshape", ["image", g.const(np.array([-1, 64], np.int64))])
        g.save(os.path.join(out_dir, f"{name}.onnx"), inp, v["build"](g, x), v["doc"])
    write_task(out_dir, "digits", "image", xev, yev, variants,
               input_decl=dict(name="image", datatype="FP32", shape=[-1, 8, 8]),
               description="Handwritten digits 0-9 from a degraded 8x8 camera "
                           "(scikit-learn digits with shift, noise and occlusion)",
               grades=grades)
    return yev


# ----------------------------------------------------------------------------------------------
# Task 2: spoken digits (audio)
# ----------------------------------------------------------------------------------------------
VOICES = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
          "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4",
            "+f5", "+croak", "+klatt", "+klatt2", "+whisper"]


def synth(word, voice, speed, pitch):
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                          "--stdout", word], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        sr = w.getframerate()
        a = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    # Resample to 8 kHz by linear interpolation (espeak-ng speaks at 22.05 kHz).
    t = np.arange(0, len(a) / sr, 1.0 / SR)
    return np.interp(t, np.arange(len(a)) / sr, a).astype(np.float32)


def place(a, rng):
    """Trim silence, place the word at a random offset in a 0.8 s clip, add background noise."""
    nz = np.nonzero(np.abs(a) > 0.01)[0]
    if len(nz):
        a = a[nz[0]:nz[-1] + 1]
    a = a[:CLIP]
    clip = np.zeros(CLIP, np.float32)
    off = rng.integers(0, CLIP - len(a) + 1)
    clip[off:off + len(a)] = a
    peak = np.abs(clip).max() + 1e-6
    clip = clip / peak * rng.uniform(0.2, 0.9)
    snr_db = rng.choice([30, 20, 10, 5, 0], p=[0.3, 0.25, 0.2, 0.15, 0.1])
    sig = np.sqrt(np.mean(clip[off:off + len(a)] ** 2)) + 1e-6
    noise = rng.normal(0, sig / (10 ** (snr_db / 20)), CLIP)
    # Low-frequency hum mixed into part of the noise, like a machine room.
    hum = np.sin(2 * np.pi * rng.uniform(50, 120) * np.arange(CLIP) / SR) * sig * rng.uniform(0, 0.5)
    return np.clip(clip + noise + hum, -1, 1)


def make_audio(n_per_class, rng):
    """The pipeline's clips: one moderate degradation (``place``) for all."""
    xs, ys = [], []
    for label, word in enumerate(CLASSES):
        for _ in range(n_per_class):
            voice = rng.choice(VOICES) + rng.choice(VARIANTS)
            a = synth(word, voice, int(rng.integers(110, 230)), int(rng.integers(15, 85)))
            xs.append(place(a, rng))
            ys.append(label)
    x = (np.stack(xs) * 32767).astype(np.int16)
    return x, np.array(ys)


# Difficulty grades of the spoken_digits task, from a quiet room (0) to a loud one where
# another speaker talks underneath (4): signal-to-noise ratio per grade, and how often each
# grade occurs.
SEVERITY_SNR_DB = [30, 16, 8, 2, -3]
SEVERITY_P = [0.25, 0.25, 0.2, 0.15, 0.15]


def trim(a):
    nz = np.nonzero(np.abs(a) > 0.01)[0]
    return a[nz[0]:nz[-1] + 1] if len(nz) else a


def room_response(rng, t60):
    """A synthetic room impulse response: the direct path, then exponentially decaying noise
    (-60 dB at ``t60`` seconds)."""
    n = int(SR * t60)
    h = rng.normal(0, 1, n) * np.exp(-6.9 * np.arange(n) / n)
    h[0] = 1.0 + abs(h[0])
    return h / np.sqrt((h ** 2).sum())


def degrade_clip(a, others, rng, sev):
    """One clip at difficulty grade ``sev``: reverberation (grade 2 and up, often), white or
    low-passed background noise at the grade's SNR, mains hum, another word underneath
    (grade 3 and up), then a random gain."""
    a = trim(a)[:CLIP]
    if sev >= 2 and rng.random() < 0.6:
        a = np.convolve(a, room_response(rng, rng.uniform(0.1, 0.25 + 0.1 * sev)))[:CLIP]
    clip = np.zeros(CLIP, np.float32)
    off = rng.integers(0, CLIP - len(a) + 1)
    clip[off:off + len(a)] = a
    sig = np.sqrt(np.mean(a ** 2)) + 1e-6
    snr_db = SEVERITY_SNR_DB[sev] + rng.uniform(-2, 2)
    noise = rng.normal(0, 1, CLIP)
    if sev >= 1 and rng.random() < 0.5:  # low-passed noise, like a machine room
        noise = np.convolve(noise, np.ones(8) / 8, "same")
    noise = noise / (np.sqrt(np.mean(noise ** 2)) + 1e-9) * sig / (10 ** (snr_db / 20))
    if sev >= 3:
        o = trim(others[rng.integers(len(others))])[:CLIP]
        under = np.zeros(CLIP)
        at = rng.integers(0, CLIP - len(o) + 1)
        under[at:at + len(o)] = o
        noise = noise + under / (np.sqrt(np.mean(o ** 2)) + 1e-9) * sig * rng.uniform(0.3, 0.6)
    hum = np.sin(2 * np.pi * rng.uniform(50, 120) * np.arange(CLIP) / SR) * sig * rng.uniform(0, 0.5)
    x = clip + noise + hum
    return x / (np.abs(x).max() + 1e-6) * rng.uniform(0.2, 0.9)


def speak_words(n_per_class, rng):
    """``n_per_class`` utterances of every word, each in a random voice, speed and pitch."""
    out = []
    for label, word in enumerate(CLASSES):
        for _ in range(n_per_class):
            voice = rng.choice(VOICES) + rng.choice(VARIANTS)
            out.append((label, synth(word, voice, int(rng.integers(90, 280)), int(rng.integers(5, 95)))))
    return out


def graded_audio(words, rng, copies=1):
    """Every utterance ``copies`` times, each copy at an independently drawn difficulty grade:
    (clips INT16 [N, CLIP], labels, grades)."""
    pool = [a for _, a in words]
    xs, ys, grades = [], [], []
    for _ in range(copies):
        for label, a in words:
            sev = int(rng.choice(len(SEVERITY_P), p=SEVERITY_P))
            xs.append(degrade_clip(a, pool, rng, sev))
            ys.append(label)
            grades.append(sev)
    return (np.stack(xs) * 32767).astype(np.int16), np.array(ys), np.array(grades)


def mel_filters(n_bins, n_mels, sr):
    def hz2mel(f):
        return 2595 * np.log10(1 + f / 700)

    def mel2hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    freqs = np.linspace(0, sr / 2, n_bins)
    pts = mel2hz(np.linspace(hz2mel(60), hz2mel(sr / 2), n_mels + 2))
    fb = np.zeros((n_bins, n_mels), np.float32)
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        fb[:, m] = np.clip(np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)), 0, None)
    return fb / (fb.sum(axis=0, keepdims=True) + 1e-9)


class FrontEnd:
    """STFT power -> filterbank -> log -> mean over time segments -> per-utterance mean removal."""

    def __init__(self, n_fft, hop, n_mels, segments):
        self.n_fft, self.hop, self.segments = n_fft, hop, segments
        bins = n_fft // 2 + 1
        n = np.arange(n_fft)
        win = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
        k = np.arange(bins)[:, None]
        self.cos = (np.cos(2 * np.pi * k * n / n_fft) * win).astype(np.float32)
        self.sin = (-np.sin(2 * np.pi * k * n / n_fft) * win).astype(np.float32)
        self.mel = mel_filters(bins, n_mels, SR)
        self.frames = (CLIP - n_fft) // hop + 1
        pool = np.zeros((self.frames, segments), np.float32)
        for t in range(self.frames):
            pool[t, min(t * segments // self.frames, segments - 1)] = 1.0
        self.pool = pool / pool.sum(axis=0, keepdims=True)
        self.n_mels = n_mels

    def numpy(self, pcm):
        x = pcm.astype(np.float32) / 32768.0
        idx = np.arange(self.frames)[:, None] * self.hop + np.arange(self.n_fft)[None, :]
        fr = x[:, idx]  # N, T, n_fft
        re = fr @ self.cos.T
        im = fr @ self.sin.T
        p = re * re + im * im  # N, T, bins
        lm = np.log(p @ self.mel + 1e-6)  # N, T, M
        lm = lm - lm.mean(axis=(1, 2), keepdims=True)
        f = np.transpose(lm, (0, 2, 1)) @ self.pool  # N, M, S
        return f.reshape(len(x), -1)

    def graph(self, g):
        x = g.op("Cast", ["waveform"], to=TensorProto.FLOAT)
        x = g.op("Mul", [x, g.const(np.array(1.0 / 32768.0, np.float32))])
        x = g.op("Reshape", [x, g.const(np.array([-1, 1, CLIP], np.int64))])
        kern = np.concatenate([self.cos, self.sin])[:, None, :]  # 2B, 1, n_fft
        y = g.op("Conv", [x, g.const(kern)], strides=[self.hop])  # N, 2B, T
        y = g.op("Mul", [y, y])
        bins = self.n_fft // 2 + 1
        y = g.op("Reshape", [y, g.const(np.array([-1, 2, bins, self.frames], np.int64))])
        y = g.op("ReduceSum", [y, g.const(np.array([1], np.int64))], keepdims=0)  # N, B, T
        y = g.op("Transpose", [y], perm=[0, 2, 1])  # N, T, B
        y = g.op("MatMul", [y, g.const(self.mel)])  # N, T, M
        y = g.op("Log", [g.op("Add", [y, g.const(np.array(1e-6, np.float32))])])
        mean = g.op("ReduceMean", [y], axes=[1, 2], keepdims=1)
        y = g.op("Sub", [y, mean])
        y = g.op("Transpose", [y], perm=[0, 2, 1])  # N, M, T
        y = g.op("MatMul", [y, g.const(self.pool)])  # N, M, S
        return g.op("Reshape", [y, g.const(np.array([-1, self.n_mels * self.segments], np.int64))])


def build_spoken(out_dir, rng, per_class_train, per_class_eval):
    print(f"  synthesising {10 * (per_class_train + per_class_eval)} utterances with espeak-ng ...",
          flush=True)
    train_words = speak_words(per_class_train, rng)
    eval_words = speak_words(per_class_eval, rng)
    # Training: every utterance three times at independent grades; evaluation: once.
    xtr, ytr, _ = graded_audio(train_words, rng, copies=3)
    xev, yev, grades = graded_audio(eval_words, rng)
    specs = {
        "small": (FrontEnd(64, 64, 16, 4), None, "64-point frames, 16 bands x 4 segments, linear"),
        "medium": (FrontEnd(256, 128, 24, 6), ((64,), 1e-3), "256-point STFT hop 128, 24 mel x 6, MLP(64)"),
        "large": (FrontEnd(512, 32, 40, 16), ((512, 256), 3e-2), "512-point STFT hop 32, 40 mel x 16, MLP(512,256)"),
    }
    variants = {}
    for name, (fe, hidden, doc) in specs.items():
        ftr, fev = fe.numpy(xtr), fe.numpy(xev)
        mu, sd = ftr.mean(axis=0), ftr.std(axis=0) + 1e-6
        ztr, zev = (ftr - mu) / sd, (fev - mu) / sd
        if hidden is None:
            clf = LogisticRegression(max_iter=3000, C=0.5).fit(ztr, ytr)
            layers = [(clf.coef_.T.astype(np.float32), clf.intercept_.astype(np.float32))]
        else:
            clf = MLPClassifier(hidden[0], max_iter=300, alpha=hidden[1], random_state=3).fit(ztr, ytr)
            layers = mlp_layers(clf)
        # Fold standardisation into the first layer: ((f - mu)/sd) W + b = f (W/sd) + (b - (mu/sd) W)
        w0, b0 = layers[0]
        folded = [((w0 / sd[:, None]).astype(np.float32), (b0 - (mu / sd) @ w0).astype(np.float32))]
        folded += layers[1:]
        probs = softmax(np_mlp(zev, layers))

        def build(g, _x, fe=fe, folded=folded):
            return g.op("Softmax", [g.mlp(fe.graph(g), folded)], axis=1)

        variants[name] = dict(probs=probs, build=build, doc=doc)

    inp = helper.make_tensor_value_info("waveform", TensorProto.INT16, ["N", CLIP])
    for name, v in variants.items():
        g = Graph(f"spoken_digits_{name}")
        g.save(os.path.join(out_dir, f"{name}.onnx"), inp, v["build"](g, None), v["doc"])
    write_task(out_dir, "spoken_digits", "audio", xev, yev, variants,
               input_decl=dict(name="waveform", datatype="INT16", shape=[-1, CLIP]),
               description="Spoken digits 0-9, 0.8 s of 8 kHz PCM16 from quiet to loud rooms "
                           "(espeak-ng voices, speeds and pitches; noise, reverberation, "
                           "another speaker)",
               grades=grades)
    return yev


# ----------------------------------------------------------------------------------------------
# Occlusion explanations of the two tasks: 2x2-pixel patches of the image (masked to the blank
# background), 50 ms segments of the clip (masked with the clip's own quietest segment: digital
# silence never occurs in a recording, and the model reads it as evidence of its own).
EXPLAIN = {
    "digits": ["[explain]", "grid = [4, 4]", "baseline = 0.0", ""],
    "spoken_digits": ["[explain]", "grid = [16]", 'fill = "quietest"', ""],
}


# ----------------------------------------------------------------------------------------------
# Writing a task folder
# ----------------------------------------------------------------------------------------------
def write_task(out_dir, task, modality, xev, yev, variants, input_decl, description,
               output_decl=None, preds=None, grades=None):
    """``preds``: per variant, the class each held-out sample ends up as (defaults to the argmax
    of the variant's own output); a pipeline stage's correctness is measured in context.
    ``grades``: each held-out sample's difficulty grade (a ``severity`` column, and accuracy per
    grade in the printout); with it, every variant's output on every held-out sample is kept
    in ``eval/probabilities.bin`` (FP32, [variant, sample, class], little-endian) for the
    simulator's refinement and fusion."""
    output_decl = output_decl or dict(name="probabilities", shape=[-1, 10])
    ev_dir = os.path.join(out_dir, "eval")
    os.makedirs(ev_dir, exist_ok=True)
    xev.astype(xev.dtype.newbyteorder("<")).tofile(os.path.join(ev_dir, "inputs.bin"))
    names = list(variants)
    preds = preds or {n: variants[n]["probs"].argmax(axis=1) for n in names}
    with open(os.path.join(ev_dir, "labels.csv"), "w") as f:
        f.write("index,label," + ",".join(names) + "," + ",".join(f"{n}_pred" for n in names)
                + (",severity" if grades is not None else "") + "\n")
        for i, y in enumerate(yev):
            f.write(f"{i},{y}," + ",".join(str(int(preds[n][i] == y)) for n in names) + ","
                    + ",".join(str(int(preds[n][i])) for n in names)
                    + (f",{int(grades[i])}" if grades is not None else "") + "\n")
    if grades is not None:
        probs = np.stack([variants[n]["probs"] for n in names]).astype("<f4")
        probs.tofile(os.path.join(ev_dir, "probabilities.bin"))
    onnx_ok = check_with_onnxruntime(out_dir, names, input_decl["name"], xev, variants)
    lines = [
        "# Generated by scripts/build_zoo.py; accuracy is measured on eval/ (held out).",
        f'task = "{task}"',
        f'modality = "{modality}"',
        f'description = "{description}"',
        f"labels = [{', '.join(repr(c).replace(chr(39), chr(34)) for c in CLASSES)}]",
        "",
        "[[inputs]]",
        f'name = "{input_decl["name"]}"',
        f'datatype = "{input_decl["datatype"]}"',
        f"shape = {input_decl['shape']}",
        "",
        "[[outputs]]",
        f'name = "{output_decl["name"]}"',
        'datatype = "FP32"',
        f"shape = {output_decl['shape']}",
        "",
    ] + EXPLAIN.get(task, []) + [
        "[eval]",
        'inputs = "eval/inputs.bin"',
        'labels = "eval/labels.csv"',
        f"samples = {len(yev)}",
    ] + (['probabilities = "eval/probabilities.bin"'] if grades is not None else [])
    print(f"  {task}: {len(yev)} held-out samples (onnxruntime check: {onnx_ok})")
    for n in names:
        acc = float((preds[n] == yev).mean())
        per_class = [float((preds[n][yev == c] == c).mean()) for c in range(10)]
        size = os.path.getsize(os.path.join(out_dir, f"{n}.onnx"))
        lines += [
            "",
            "[[variants]]",
            f'name = "{n}"',
            f'file = "{n}.onnx"',
            f'description = "{variants[n]["doc"]}"',
            f"accuracy = {acc:.4f}",
            f"class_accuracy = [{', '.join(f'{a:.4f}' for a in per_class)}]",
            f"memory_mb = {max(1, round(size * 3 / 1e6))}",
            "threads = 1",
        ]
        by_grade = ""
        if grades is not None:
            by_grade = "  by grade " + " ".join(
                f"{float((preds[n][grades == g] == yev[grades == g]).mean()):.2f}"
                for g in sorted(set(grades.tolist())))
        print(f"    {n:7s} accuracy {acc:.3f}  ({size / 1e6:.2f} MB){by_grade}")
    with open(os.path.join(out_dir, "model.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_stage(repo, dirname, variants, in_decl, out_decl, xin, yev, correct_of, description,
                modality="image", prepare=None):
    """One pipeline stage's model folder: every variant's graph (``v["graph"](g, x)`` after the
    optional ``prepare(g, input_name)``), its numpy output on ``xin`` and its accuracy in context
    (``correct_of(output)`` is the class the pipeline ends up with)."""
    out_dir = os.path.join(repo, dirname)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    elem = {"FP32": TensorProto.FLOAT, "INT16": TensorProto.INT16}[in_decl["datatype"]]
    inp = helper.make_tensor_value_info(in_decl["name"], elem, ["N", *in_decl["shape"][1:]])
    if in_decl["datatype"] == "FP32":
        xin = xin.astype(np.float32)
    for name, v in variants.items():
        g = Graph(f"{dirname}_{name}")
        x = prepare(g, in_decl["name"]) if prepare else in_decl["name"]
        g.save(os.path.join(out_dir, f"{name}.onnx"), inp, v["graph"](g, x), v["doc"],
               out_name=out_decl["name"], out_dims=tuple(out_decl["shape"][1:]))
        v["probs"] = v["np"](xin).astype(np.float32)
    preds = {n: correct_of(v["probs"]) for n, v in variants.items()}
    write_task(out_dir, dirname, modality, xin, yev, variants, in_decl, description,
               output_decl=out_decl, preds=preds)


def write_pipeline(repo, name, xev, yev, description, slo_ms, stages, combos):
    """The pipeline folder: pipeline.toml, the end-to-end held-out set and every combination's
    accuracy. ``stages``: (stage name, model, {input: previous output} or None)."""
    pdir = os.path.join(repo, name)
    shutil.rmtree(pdir, ignore_errors=True)
    os.makedirs(os.path.join(pdir, "eval"))
    xev.astype(xev.dtype.newbyteorder("<")).tofile(os.path.join(pdir, "eval", "inputs.bin"))
    with open(os.path.join(pdir, "eval", "labels.csv"), "w") as f:
        f.write("index,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(yev)))
    with open(os.path.join(pdir, "eval", "end_to_end.csv"), "w") as f:
        f.write(",".join(s[0] for s in stages) + ",accuracy\n")
        f.write("".join(",".join(c[:-1]) + f",{c[-1]:.4f}\n" for c in combos))
    text = ("# Generated by scripts/build_zoo.py. eval/ holds the end-to-end held-out set and\n"
            "# eval/end_to_end.csv the accuracy of every combination of variants.\n"
            f'description = "{description}"\nslo_ms = {slo_ms}\n')
    for stage, model, inputs in stages:
        text += f'\n[[stages]]\nname = "{stage}"\nmodel = "{model}"\n'
        if inputs:
            text += "inputs = { " + ", ".join(f'{k} = "{v}"' for k, v in inputs.items()) + " }\n"
    with open(os.path.join(pdir, "pipeline.toml"), "w") as f:
        f.write(text)
    best = max(combos, key=lambda c: c[-1])
    worst = min(combos, key=lambda c: c[-1])
    print(f"  {name}: end to end {worst[-1]:.3f} ({'/'.join(worst[:-1])}) .. "
          f"{best[-1]:.3f} ({'/'.join(best[:-1])}) over {len(yev)} held-out inputs")


# ----------------------------------------------------------------------------------------------
# Pipeline 1: digits_pipeline = digits_denoise -> digits_classify -> digits_calibrate
# ----------------------------------------------------------------------------------------------
def box_blur_matrix():
    """64x64 matrix of a 3x3 mean filter with edge renormalisation."""
    m = np.zeros((64, 64), np.float32)
    for r in range(8):
        for c in range(8):
            nb = [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                  if 0 <= r + dr < 8 and 0 <= c + dc < 8]
            for r2, c2 in nb:
                m[r2 * 8 + c2, r * 8 + c] = 1.0 / len(nb)
    return m


def build_digits_pipeline(repo, rng):
    """Three stage models whose variants differ in accuracy, latency and cost, and the
    pipeline that chains them. Each stage's accuracy is measured in context: the denoiser's
    through the reference (medium) classifier and calibrator, the classifier's on
    reference-denoised images, the calibrator's on the reference classifier's output."""
    from sklearn.decomposition import PCA
    from sklearn.neural_network import MLPRegressor

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target
    idx = rng.permutation(len(y))
    ev, cal, tr = idx[:400], idx[400:850], idx[850:]
    heavy = degrade
    xtr_clean = np.concatenate([x[tr]] * 4).reshape(-1, 64)
    xtr = np.concatenate([heavy(x[tr], rng) for _ in range(4)]).reshape(-1, 64)
    ytr = np.concatenate([y[tr]] * 4)
    xcal, ycal = heavy(x[cal], rng).reshape(-1, 64), y[cal]
    xev_img, yev = heavy(x[ev], rng), y[ev]
    xev = xev_img.reshape(-1, 64)

    # Stage 1: denoise, image [N,8,8] -> clean [N,64].
    blur = box_blur_matrix()
    pca = PCA(n_components=20, random_state=0).fit(xtr_clean)
    p_w = (pca.components_.T @ pca.components_).astype(np.float32)
    p_b = (pca.mean_ - pca.mean_ @ pca.components_.T @ pca.components_).astype(np.float32)
    ae = MLPRegressor(hidden_layer_sizes=(768, 768), max_iter=30, random_state=3).fit(xtr, xtr_clean)
    ae_layers = mlp_layers(ae)
    den = {
        "small": dict(np=lambda f: f @ blur, graph=lambda g, v: g.op("MatMul", [v, g.const(blur)]),
                      doc="3x3 mean filter"),
        "medium": dict(np=lambda f: f @ p_w + p_b, graph=lambda g, v: g.mlp(v, [(p_w, p_b)]),
                       doc="projection on 20 principal components of clean digits"),
        "large": dict(np=lambda f: np_mlp(f, ae_layers), graph=lambda g, v: g.mlp(v, ae_layers),
                      doc="denoising MLP autoencoder 64-768-768-64"),
    }

    # Stage 2: classify, clean [N,64] -> probabilities [N,10], trained on reference-denoised.
    ref_den = den["medium"]["np"]
    ftr, fcal, fev = ref_den(xtr), ref_den(xcal), ref_den(xev)
    lr = LogisticRegression(max_iter=3000, C=0.5).fit(ftr, ytr)
    lin = [(lr.coef_.T.astype(np.float32), lr.intercept_.astype(np.float32))]
    med = MLPClassifier((96,), max_iter=60, random_state=1).fit(ftr, ytr)
    med_layers = mlp_layers(med)
    # large: a wide MLP trained on the reference-denoised images of the clean, the degraded
    # and every 1-pixel shift of the degraded training images.
    shifted = [ref_den(xtr @ shift_matrix(dx, dy)) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    big = MLPClassifier((1024, 1024), max_iter=25, random_state=2).fit(
        np.concatenate([ftr, ref_den(xtr_clean)] + shifted), np.concatenate([ytr] * 6))
    big_layers = mlp_layers(big)

    cls = {
        "small": dict(np=lambda f: softmax(np_mlp(f, lin)),
                      graph=lambda g, v: g.op("Softmax", [g.mlp(v, lin)], axis=1), doc="linear classifier"),
        "medium": dict(np=lambda f: softmax(np_mlp(f, med_layers)),
                       graph=lambda g, v: g.op("Softmax", [g.mlp(v, med_layers)], axis=1), doc="MLP 64-96-10"),
        "large": dict(np=lambda f: softmax(np_mlp(f, big_layers)),
                      graph=lambda g, v: g.op("Softmax", [g.mlp(v, big_layers)], axis=1),
                      doc="MLP 64-1024-1024-10 trained with shifted copies"),
    }

    # Stage 3: calibrate, probabilities [N,10] -> probabilities [N,10], fitted on the
    # calibration split of the reference classifier's output.
    ref_cls = cls["medium"]["np"]
    pcal = ref_cls(fcal)
    lcal = np.log(np.clip(pcal, 1e-6, 1.0))
    temps = np.linspace(0.3, 3.0, 28)
    nll = [-np.log(softmax(lcal / t)[np.arange(len(ycal)), ycal] + 1e-9).mean() for t in temps]
    temp = float(temps[int(np.argmin(nll))])
    vec = LogisticRegression(max_iter=3000, C=0.05).fit(lcal, ycal)
    v_layers = [(vec.coef_.T.astype(np.float32), vec.intercept_.astype(np.float32))]

    def log_p(g, v):
        return g.op("Log", [g.op("Clip", [v, g.const(np.array(1e-6, np.float32)),
                                          g.const(np.array(1.0, np.float32))])])

    cal_v = {
        "small": dict(np=lambda p: softmax(np.log(np.clip(p, 1e-6, 1)) / temp),
                      graph=lambda g, v: g.op("Softmax", [g.op("Mul", [log_p(g, v), g.const(
                          np.array(1.0 / temp, np.float32))])], axis=1),
                      doc=f"temperature scaling (T = {temp:.2f})"),
        "medium": dict(np=lambda p: softmax(np_mlp(np.log(np.clip(p, 1e-6, 1)), v_layers)),
                       graph=lambda g, v: g.op("Softmax", [g.mlp(log_p(g, v), v_layers)], axis=1),
                       doc="matrix scaling of log-probabilities"),
    }
    # A stage sees only its input, so the stacker reads log-probabilities alone ([N,10] ->
    # [N,10]) and can only undo the reference classifier's systematic confusions.
    stk = MLPClassifier((512, 512), max_iter=300, random_state=4, alpha=1.0).fit(lcal, ycal)
    stk_layers = mlp_layers(stk)
    cal_v["large"] = dict(np=lambda p: softmax(np_mlp(np.log(np.clip(p, 1e-6, 1)), stk_layers)),
                          graph=lambda g, v: g.op("Softmax", [g.mlp(log_p(g, v), stk_layers)], axis=1),
                          doc="MLP 10-512-512-10 over log-probabilities")

    clean_decl = dict(name="clean", datatype="FP32", shape=[-1, 64])
    prob_decl = dict(name="probabilities", datatype="FP32", shape=[-1, 10])
    calibrated_decl = dict(name="calibrated", datatype="FP32", shape=[-1, 10])
    to64 = lambda g, name: g.op("Reshape", [name, g.const(np.array([-1, 64], np.int64))])  # noqa: E731
    flat = lambda f: f.reshape(len(f), -1)  # noqa: E731
    for v in den.values():
        v["np"] = (lambda f, inner=v["np"]: inner(flat(f)))
    write_stage(repo, "digits_denoise", den, dict(name="image", datatype="FP32", shape=[-1, 8, 8]),
                clean_decl, xev_img, yev, lambda out: cal_v["small"]["np"](ref_cls(out)).argmax(axis=1),
                "Pipeline stage 1: denoise a degraded 8x8 digit (accuracy through the reference classifier)",
                prepare=to64)
    write_stage(repo, "digits_classify", cls, clean_decl, prob_decl, fev, yev,
                lambda out: cal_v["small"]["np"](out).argmax(axis=1),
                "Pipeline stage 2: classify a denoised digit (accuracy on reference-denoised input)")
    write_stage(repo, "digits_calibrate", cal_v, prob_decl, calibrated_decl, ref_cls(fev), yev,
                lambda out: out.argmax(axis=1),
                "Pipeline stage 3: recalibrate class probabilities (accuracy on the reference classifier)")

    combos = []
    for a, da in den.items():
        fa = da["np"](xev)
        for b, cb in cls.items():
            pb = cb["np"](fa)
            for c, cc in cal_v.items():
                combos.append((a, b, c, float((cc["np"](pb).argmax(axis=1) == yev).mean())))
    write_pipeline(repo, "digits_pipeline", xev_img.astype(np.float32), yev,
                   "degraded 8x8 digit -> denoise -> classify -> calibrate", 50,
                   [("denoise", "digits_denoise", None),
                    ("classify", "digits_classify", {"clean": "clean"}),
                    ("calibrate", "digits_calibrate", {"probabilities": "probabilities"})], combos)


# ----------------------------------------------------------------------------------------------
# Pipeline 2: spoken_pipeline = spoken_features -> spoken_encode -> spoken_classify
# ----------------------------------------------------------------------------------------------
EMBED = 16
MELS, SEGS = 40, 16


def build_spoken_pipeline(repo, rng, per_class_train, per_class_eval):
    """audio -> feature extractor -> encoder -> classifier. Every front end yields the same
    40 log-mel bands x 16 time segments, standardised with its own training statistics, so any
    encoder reads any front end; the encoders map features into one 32-d embedding space, the
    large encoder's own (the small and medium encoders are distilled from it), so any classifier
    reads any encoder. Accuracy per stage is measured in context with the other stages at their
    reference (medium) variant."""
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor

    print(f"  synthesising {10 * (per_class_train + per_class_eval)} clips with espeak-ng ...",
          flush=True)
    xtr, ytr = make_audio(per_class_train, rng)
    xev, yev = make_audio(per_class_eval, rng)

    # Stage 1: waveform INT16 [N, 6400] -> features [N, MELS * SEGS].
    fronts = {
        "small": (FrontEnd(64, 64, MELS, SEGS), f"64-point frames (33 bins) -> {MELS} log bands x {SEGS} segments"),
        "medium": (FrontEnd(256, 128, MELS, SEGS), f"256-point STFT, hop 128 -> {MELS} log-mel x {SEGS} segments"),
        "large": (FrontEnd(512, 32, MELS, SEGS), f"512-point STFT, hop 32 -> {MELS} log-mel x {SEGS} segments"),
    }
    feats = {}
    for name, (fe, doc) in fronts.items():
        f = fe.numpy(xtr)
        mu, inv = f.mean(axis=0).astype(np.float32), (1.0 / (f.std(axis=0) + 1e-6)).astype(np.float32)

        def np_fn(pcm, fe=fe, mu=mu, inv=inv):
            return (fe.numpy(pcm) - mu) * inv

        def graph(g, _x, fe=fe, mu=mu, inv=inv):
            return g.op("Mul", [g.op("Sub", [fe.graph(g), g.const(mu)]), g.const(inv)])

        feats[name] = dict(np=np_fn, graph=graph, doc=doc)
    ftr = {n: v["np"](xtr) for n, v in feats.items()}
    fev = {n: v["np"](xev) for n, v in feats.items()}

    # Stage 2: features [N, 256] -> embedding [N, 32]. The large encoder is the trunk of a
    # classifier trained on every front end's features; its last hidden layer is the embedding.
    all_f = np.concatenate([ftr[n] for n in feats])
    all_y = np.concatenate([ytr] * len(feats))
    teacher = MLPClassifier((512, 256, EMBED), max_iter=80, alpha=1e-3, random_state=5).fit(all_f, all_y)
    trunk = mlp_layers(teacher)[:-1]

    def np_trunk(f):
        return np.maximum(np_mlp(f, trunk), 0)

    target = np_trunk(all_f)
    ridge = Ridge(alpha=1.0).fit(all_f, target)
    lin = [(ridge.coef_.T.astype(np.float32), ridge.intercept_.astype(np.float32))]
    student = MLPRegressor(hidden_layer_sizes=(24,), max_iter=200, random_state=6).fit(all_f, target)
    stu = mlp_layers(student)
    relu_out = lambda g, v, layers: g.op("Relu", [g.mlp(v, layers)])  # noqa: E731
    enc = {
        "small": dict(np=lambda f: np.maximum(np_mlp(f, lin), 0),
                      graph=lambda g, v: relu_out(g, v, lin),
                      doc="linear map fitted to the large encoder's embedding"),
        "medium": dict(np=lambda f: np.maximum(np_mlp(f, stu), 0),
                       graph=lambda g, v: relu_out(g, v, stu),
                       doc=f"MLP {MELS * SEGS}-24-{EMBED} distilled from the large encoder"),
        "large": dict(np=np_trunk, graph=lambda g, v: relu_out(g, v, trunk),
                      doc=f"MLP {MELS * SEGS}-512-256-{EMBED}, trunk of a classifier trained on every front end"),
    }

    # Stage 3: embedding [N, 32] -> probabilities [N, 10], trained on the embeddings of every
    # encoder over every front end.
    emb_tr = np.concatenate([e["np"](ftr[n]) for e in enc.values() for n in feats])
    emb_y = np.concatenate([ytr] * (len(enc) * len(feats)))
    # The small head is fitted on three clips per class (a head a site can fit from a few
    # labelled examples); the others on everything.
    few = np.concatenate([rng.choice(np.nonzero(ytr == c)[0], 3, replace=False) for c in range(10)])
    lr = LogisticRegression(max_iter=2000, C=0.01).fit(enc["large"]["np"](ftr["medium"])[few], ytr[few])
    lr_layers = [(lr.coef_.T.astype(np.float32), lr.intercept_.astype(np.float32))]
    mid = MLPClassifier((32,), max_iter=200, random_state=7).fit(emb_tr, emb_y)
    big = MLPClassifier((512, 512), max_iter=60, alpha=1e-3, random_state=8).fit(emb_tr, emb_y)
    heads = {}
    for name, layers, doc in (("small", lr_layers, "linear classifier fitted on 3 clips per class"),
                              ("medium", mlp_layers(mid), f"MLP {EMBED}-32-10"),
                              ("large", mlp_layers(big), f"MLP {EMBED}-512-512-10")):
        heads[name] = dict(np=lambda e, layers=layers: softmax(np_mlp(e, layers)),
                           graph=lambda g, v, layers=layers: g.op("Softmax", [g.mlp(v, layers)], axis=1),
                           doc=doc)

    feat_decl = dict(name="features", datatype="FP32", shape=[-1, MELS * SEGS])
    emb_decl = dict(name="embedding", datatype="FP32", shape=[-1, EMBED])
    prob_decl = dict(name="probabilities", datatype="FP32", shape=[-1, 10])
    ref_enc, ref_head = enc["medium"]["np"], heads["medium"]["np"]
    write_stage(repo, "spoken_features", feats, dict(name="waveform", datatype="INT16", shape=[-1, CLIP]),
                feat_decl, xev, yev, lambda out: ref_head(ref_enc(out)).argmax(axis=1),
                "Pipeline stage 1: log-mel features of a spoken digit (accuracy through the reference "
                "encoder and classifier)", modality="audio")
    write_stage(repo, "spoken_encode", enc, feat_decl, emb_decl, fev["medium"], yev,
                lambda out: ref_head(out).argmax(axis=1),
                "Pipeline stage 2: embed log-mel features (accuracy on reference features through the "
                "reference classifier)", modality="audio")
    write_stage(repo, "spoken_classify", heads, emb_decl, prob_decl, ref_enc(fev["medium"]), yev,
                lambda out: out.argmax(axis=1),
                "Pipeline stage 3: classify an embedding (accuracy on reference embeddings)", modality="audio")
    combos = []
    for a in feats:
        for b, e in enc.items():
            emb = e["np"](fev[a])
            for c, h in heads.items():
                combos.append((a, b, c, float((h["np"](emb).argmax(axis=1) == yev).mean())))
    write_pipeline(repo, "spoken_pipeline", xev, yev,
                   "spoken digit, 0.8 s of 8 kHz PCM16 -> features -> encode -> classify", 50,
                   [("features", "spoken_features", None),
                    ("encode", "spoken_encode", {"features": "features"}),
                    ("classify", "spoken_classify", {"embedding": "embedding"})], combos)


def check_with_onnxruntime(out_dir, names, input_name, xev, variants):
    try:
        import onnxruntime as ort
    except ImportError:
        return "skipped (onnxruntime not installed)"
    for n in names:
        s = ort.InferenceSession(os.path.join(out_dir, f"{n}.onnx"), providers=["CPUExecutionProvider"])
        got = s.run(None, {input_name: xev[:64]})[0]
        want = variants[n]["probs"][:64]
        err = float(np.abs(got - want).max())
        if err > 1e-3:
            sys.exit(f"{out_dir}/{n}.onnx disagrees with the numpy reference (max |diff| {err})")
    return "ok"


def main():
    warnings.filterwarnings("ignore")  # sklearn convergence chatter; accuracy is measured below
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train-per-class", type=int, default=260)
    ap.add_argument("--eval-per-class", type=int, default=60,
                    help="held-out utterances per class of spoken_digits (its pipeline takes 40)")
    ap.add_argument("--only", choices=["tasks", "pipelines", "digits_pipeline", "spoken_pipeline"],
                    help="build only the single-model tasks, only the pipelines, or one pipeline")
    args = ap.parse_args()
    if args.only in (None, "tasks", "pipelines", "spoken_pipeline") and shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is needed for the spoken digits: apt-get install espeak-ng")
    if args.only in (None, "pipelines", "digits_pipeline"):
        print("building digits_pipeline ...", flush=True)
        build_digits_pipeline(args.out, np.random.default_rng(args.seed + 100))
    if args.only in (None, "pipelines", "spoken_pipeline"):
        print("building spoken_pipeline ...", flush=True)
        build_spoken_pipeline(args.out, np.random.default_rng(args.seed + 200), args.train_per_class, 40)
    if args.only not in (None, "tasks"):
        return
    rng = np.random.default_rng(args.seed)
    for task in ("digits", "spoken_digits"):
        d = os.path.join(args.out, task)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    print("building digits ...", flush=True)
    y_image = build_digits(os.path.join(args.out, "digits"), rng)
    print("building spoken_digits ...", flush=True)
    y_audio = build_spoken(os.path.join(args.out, "spoken_digits"), rng, args.train_per_class,
                           args.eval_per_class)
    write_pairs(os.path.join(args.out, "digit_events"), y_image, y_audio, rng)


def write_pairs(out_dir, y_image, y_audio, rng):
    """The paired multi-modal set of ``digit_events``: one event = one held-out image and one
    held-out clip of the same class, paired at random, so each modality's difficulty is
    independent of the other's. Even samples pair with even ones (the half the estimators train
    on) and odd with odd (``held_out = 1``), so held-out events never touch training inputs."""
    rows = []
    for parity in (0, 1):
        for c in range(10):
            imgs = [i for i in range(parity, len(y_image), 2) if y_image[i] == c]
            clips = [i for i in range(parity, len(y_audio), 2) if y_audio[i] == c]
            imgs, clips = list(rng.permutation(imgs)), list(rng.permutation(clips))
            rows += [(c, int(a), int(b), parity) for a, b in zip(imgs, clips)]
    order = rng.permutation(len(rows))
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    with open(os.path.join(out_dir, "eval", "pairs.csv"), "w") as f:
        f.write("event,label,image,audio,held_out\n")
        for e, k in enumerate(order):
            c, a, b, parity = rows[k]
            f.write(f"{e},{c},{a},{b},{parity}\n")
    held = sum(r[3] for r in rows)
    print(f"  digit_events: {len(rows)} paired events ({held} held out)")


if __name__ == "__main__":
    main()
