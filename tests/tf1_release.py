"""Write stand-ins of google-research/simclr's released TF1 checkpoints, with TensorFlow, for the zoo tests.

    python tests/tf1_release.py OUT_ROOT

Each model is built as a TF1 graph the way the official ``resnet.py`` / ``model_util.py`` build theirs
(the layer order, ``tf.layers``' names ``conv2d_N`` / ``batch_normalization_N``, fixed padding,
'SAME' max-pool, the SK conv, the ResNet-D shortcut, the 3-layer head whose last BN has no beta, the
classifier under ``head_supervised/linear_layer/dense``), with random weights and BN statistics, and
saved by ``tf.compat.v1.train.Saver`` into ``OUT_ROOT/<kind>/<name>/`` with ``checkpoint``,
``model.ckpt-N.{index,data,meta}`` and ``graph.pbtxt``. Beside them:

* ``expected.json``: for every TF variable, the fastclr state_dict key it must land at, written by this
  builder as it creates the layer (independently of fastclr.zoo's mapping);
* ``reference.npz``: an input batch (NHWC, [0, 1]) and TF's inference outputs on it: the backbone
  features, every projection-head layer, and the classifier's logits.

Runs in its own process (TensorFlow apart from torch). Written for the tests; not the official code.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

tf1 = tf.compat.v1
SIZE, BATCH = 64, 3
MODELS = (  # (kind, name, sk, classifier input layer, graph kept, ema copy, step)
    ("pretrained", "r50_1x_sk0", False, 0, "meta", True, 250228),
    ("finetuned_1pct", "r50_1x_sk0", False, 1, "meta", False, 751),
    ("finetuned_1pct", "r50_1x_sk1", True, 1, "pbtxt", False, 751),
    ("supervised", "r50_1x_sk0", False, 0, "meta", False, 28151),
)


class Builder:
    """Creates variables with tf.layers' names inside one scope and records where each must land."""

    values: list = []  # (variable, value) of every builder: loaded after the session initializes them

    def __init__(self, rng: np.random.Generator, scope: str, key_prefix: str, expected: dict, jitter=None):
        self.rng, self.scope, self.kp, self.expected = rng, scope, key_prefix, expected
        self.count = defaultdict(int)
        self.jitter = jitter  # the EMA copy: the online values plus a little noise

    def _var(self, name: str, value: np.ndarray, key: str):
        if self.jitter is not None:
            value = value + self.jitter.normal(0, 0.01, value.shape).astype(np.float32)
        # An initializer op, not the value: the value as a graph constant would bloat the saved graph.
        v = tf1.get_variable(name, shape=value.shape, initializer=tf1.zeros_initializer())
        Builder.values.append((v, value.astype(np.float32)))
        self.expected[v.op.name] = key
        return v

    def _next(self, kind: str) -> str:
        i = self.count[kind]
        self.count[kind] += 1
        return kind if i == 0 else f"{kind}_{i}"

    def conv(self, x, out: int, k: int, stride: int, key: str):
        cin = int(x.shape[-1])
        with tf1.variable_scope(self._next("conv2d")):
            w = self._var("kernel", self.rng.normal(0, (1 / (k * k * cin)) ** 0.5, (k, k, cin, out)),
                          f"{self.kp}{key}.weight")
        if stride > 1:  # TF1 fixed_padding, then VALID
            b = (k - 1) // 2
            x = tf.pad(x, [[0, 0], [b, k - 1 - b], [b, k - 1 - b], [0, 0]])
        return tf.nn.conv2d(x, w, strides=stride, padding="SAME" if stride == 1 else "VALID")

    def bn(self, x, key: str, relu: bool = True, center: bool = True, name: str | None = None):
        c = int(x.shape[-1])
        with tf1.variable_scope(name or self._next("batch_normalization")):
            g = self._var("gamma", self.rng.uniform(0.5, 1.5, c), f"{self.kp}{key}.weight")
            b = self._var("beta", self.rng.normal(0, 0.1, c), f"{self.kp}{key}.bias") if center else None
            m = self._var("moving_mean", self.rng.normal(0, 0.1, c), f"{self.kp}{key}.running_mean")
            v = self._var("moving_variance", self.rng.uniform(0.5, 2.0, c), f"{self.kp}{key}.running_var")
        y = (x - m) * tf.math.rsqrt(v + 1e-5) * g + (b if b is not None else 0.0)
        return tf.nn.relu(y) if relu else y

    def dense(self, x, out: int, key: str, bias: bool):
        cin = int(x.shape[-1])
        with tf1.variable_scope("dense"):
            w = self._var("kernel", self.rng.normal(0, 0.03, (cin, out)), f"{self.kp}{key}.weight")
            y = tf.matmul(x, w, name="MatMul")
            if bias:
                y = tf.nn.bias_add(y, self._var("bias", self.rng.normal(0, 0.1, out), f"{self.kp}{key}.bias"))
        return y


def sk_conv(b: Builder, x, f: int, stride: int, key: str):
    x = b.bn(b.conv(x, 2 * f, 3, stride, f"{key}.conv"), f"{key}.bn")
    s = tf.stack(tf.split(x, 2, axis=3))
    g = tf.reduce_mean(tf.reduce_sum(s, 0), [1, 2], keepdims=True)
    g = b.bn(b.conv(g, max(int(f * 0.0625), 32), 1, 1, f"{key}.fc1"), f"{key}.fc_bn")
    m = b.conv(g, 2 * f, 1, 1, f"{key}.fc2")
    m = tf.nn.softmax(tf.stack(tf.split(m, 2, axis=3)), axis=0)
    return tf.reduce_sum(s * m, 0)


def bottleneck(b: Builder, x, f: int, stride: int, projection: bool, sk: bool, key: str):
    sc = x
    if projection:  # built first, as in TF1
        if sk:
            sc = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]]) if stride > 1 else x
            sc = tf.nn.avg_pool2d(sc, 2, stride, "SAME" if stride == 1 else "VALID")
            sc = b.bn(b.conv(sc, 4 * f, 1, 1, f"{key}.downsample.1"), f"{key}.downsample.2", relu=False)
        else:
            sc = b.bn(b.conv(x, 4 * f, 1, stride, f"{key}.downsample.0"), f"{key}.downsample.1", relu=False)
    y = b.bn(b.conv(x, f, 1, 1, f"{key}.conv1"), f"{key}.bn1")
    if sk:
        y = sk_conv(b, y, f, stride, f"{key}.conv2")
    else:
        y = b.bn(b.conv(y, f, 3, stride, f"{key}.conv2"), f"{key}.bn2")
    y = b.bn(b.conv(y, 4 * f, 1, 1, f"{key}.conv3"), f"{key}.bn3", relu=False)
    return tf.nn.relu(y + sc)


def resnet50(b: Builder, x, sk: bool):
    if sk:
        x = b.bn(b.conv(x, 32, 3, 2, "deep_stem.0"), "deep_stem.1")
        x = b.bn(b.conv(x, 32, 3, 1, "deep_stem.3"), "deep_stem.4")
        x = b.conv(x, 64, 3, 1, "conv1")
    else:
        x = b.conv(x, 64, 7, 2, "conv1")
    x = b.bn(x, "bn1")
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for g, (n, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2))):
        for i in range(n):
            x = bottleneck(b, x, 64 * 2 ** g, stride if i == 0 else 1, i == 0, sk, f"layer{g + 1}.{i}")
    return tf.identity(tf.reduce_mean(x, [1, 2]), "final_avg_pool")


def head(b: Builder, h, num_layers=3, out_dim=128):
    outs = [h]
    x = h
    for j in range(num_layers):
        last = j == num_layers - 1
        with tf1.variable_scope(f"nl_{j}"):
            x = b.dense(x, out_dim if last else int(h.shape[-1]), f"head.layers.{j}.linear", bias=False)
            x = b.bn(x, f"head.layers.{j}.bn", relu=False, center=not last, name="batch_normalization")
            x = tf.identity(x, f"nl_{j}_out")
        if not last:
            x = tf.nn.relu(x)
        outs.append(x)
    return outs


def build(root: Path, kind: str, name: str, sk: bool, layer: int, graph: str, ema: bool, step: int, seed: int):
    folder = root / kind / name
    folder.mkdir(parents=True, exist_ok=True)
    g = tf.Graph()
    Builder.values = []
    expected: dict = {}
    rng = np.random.default_rng(seed)
    with g.as_default():
        x_in = tf1.placeholder(tf.float32, [None, SIZE, SIZE, 3], name="images")
        with tf1.variable_scope("base_model"):
            h = resnet50(Builder(rng, "base_model", "backbone.", expected), x_in, sk)
        with tf1.variable_scope("head_contrastive"):
            outs = head(Builder(rng, "head_contrastive", "", expected), h)
        if ema:  # a second encoder, as some releases keep; the classifier reads the online one
            jit = np.random.default_rng(seed + 1)
            ema_expected: dict = {}
            with tf1.variable_scope("ema_model"):
                with tf1.variable_scope("base_model"):
                    resnet50(Builder(np.random.default_rng(seed), "", "backbone.", ema_expected, jit), x_in, sk)
                with tf1.variable_scope("head_contrastive"):
                    head(Builder(np.random.default_rng(seed + 2), "", "", ema_expected, jit), h)
        feed = tf.stop_gradient(outs[0]) if kind == "pretrained" else outs[layer]
        with tf1.variable_scope("head_supervised"):
            with tf1.variable_scope("linear_layer"):
                logits = Builder(rng, "", "", expected).dense(feed, 1000, "fc", bias=True)
        tf1.train.get_or_create_global_step()
        with tf1.variable_scope("base_model/conv2d/kernel", reuse=False):
            tf1.get_variable("Momentum", shape=(1,), initializer=tf1.zeros_initializer())  # an optimizer slot
        x = np.random.default_rng(seed + 3).uniform(0, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            # One run sets them all: each variable's initializer, fed its value.
            sess.run([v.initializer for v, _ in Builder.values], {v.initial_value: a for v, a in Builder.values})
            got = sess.run({"h": outs[0], "layers": outs[1:], "logits": logits}, {x_in: x})
            saver = tf1.train.Saver()
            saver.save(sess, str(folder / "model.ckpt"), global_step=step)
            tf1.io.write_graph(sess.graph_def, str(folder), "graph.pbtxt")
    if graph != "meta":
        (folder / f"model.ckpt-{step}.meta").unlink()
    if graph == "none":
        (folder / "graph.pbtxt").unlink()
    np.savez(folder / "reference.npz", x=x, h=got["h"], logits=got["logits"],
             **{f"layer{j + 1}": v for j, v in enumerate(got["layers"])})
    (folder / "expected.json").write_text(json.dumps(
        {"online": expected, "ema": ema_expected if ema else {},
         "classifier_layer": layer, "step": step}, indent=0))


def main(root: str) -> None:
    for seed, (kind, name, sk, layer, graph, ema, step) in enumerate(MODELS):
        build(Path(root), kind, name, sk, layer, graph, ema, step, seed=10 * seed)


if __name__ == "__main__":
    main(sys.argv[1])
