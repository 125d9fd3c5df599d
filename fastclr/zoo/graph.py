"""Which layer a released classifier reads, from the graph the release ships with its checkpoint.

The shape of ``head_supervised/linear_layer/dense/kernel`` cannot tell: the backbone output and the
first projection-head layer are equally wide. The TF1 code decides with ``ft_proj_selector`` (the
classifier reads ``hiddens_list[k]``: k = 0 the backbone, k >= 1 head layer k after its ReLU), and the
graph saved beside the checkpoint records the decision: the classifier's ``MatMul`` takes its input from
``.../final_avg_pool`` of ``base_model`` (or of ``ema_model/base_model``), or from
``head_contrastive/Relu*`` whose input is ``head_contrastive/nl_<k-1>/nl_<k-1>_out``.

Graphs are read with TensorFlow's own protocol buffers, from the first of: ``<prefix>.meta`` (binary
MetaGraphDef), ``graph.pbtxt`` (text GraphDef), ``hub/saved_model.pb`` (the TF-Hub module).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from fastclr.runtime import UserError

# Ops that hand their first input on unchanged in value or only in dtype/shape bookkeeping.
PASS_THROUGH = {"Identity", "IdentityN", "StopGradient", "PreventGradient", "Snapshot", "Cast", "Reshape",
                "Squeeze", "CheckNumerics", "Relu"}
_CLASSIFIER = re.compile(r"(^|/)head_supervised(_\d+)?/linear_layer/dense/MatMul(_\d+)?$")
_HEAD_LAYER = re.compile(r"(^|/)head_contrastive(_\d+)?/nl_(\d+)/")
_BACKBONE = re.compile(r"(^|/)(ema_model/)?base_model(_\d+)?/")


@dataclass(frozen=True)
class ClassifierInput:
    """What the release's classifier reads: ``layer`` k (0 = backbone output, k = head layer k after its
    ReLU), ``encoder`` ("online" or "ema"), and the evidence (file and the chain of graph nodes)."""
    layer: int
    encoder: str
    evidence: str


def _graphs(folder: Path, prefix: Path):
    """(file, GraphDef) of every graph the release folder holds, best first."""
    from google.protobuf import text_format
    from tensorflow.core.framework import graph_pb2
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    meta = prefix.with_name(prefix.name + ".meta")
    if meta.is_file():
        m = meta_graph_pb2.MetaGraphDef()
        m.ParseFromString(meta.read_bytes())
        yield meta, m.graph_def
    pbtxt = folder / "graph.pbtxt"
    if pbtxt.is_file():
        g = graph_pb2.GraphDef()
        text_format.Merge(pbtxt.read_text(), g)
        yield pbtxt, g
    hub = folder / "hub" / "saved_model.pb"
    if hub.is_file():
        s = saved_model_pb2.SavedModel()
        s.ParseFromString(hub.read_bytes())
        for mg in s.meta_graphs:
            yield hub, mg.graph_def


def _node_name(inp: str) -> str:
    return inp.lstrip("^").split(":")[0]


def trace(nodes: dict, start: str) -> tuple[int, str, list[str]]:
    """(layer, encoder, chain) of the tensor ``start``: walk back through pass-through ops to the layer
    that produced it. UserError when the chain ends anywhere else."""
    chain, relu, name = [], False, _node_name(start)
    for _ in range(64):
        node = nodes.get(name)
        if node is None:
            raise UserError(f"the graph has no node {name!r} (the classifier's input)")
        chain.append(node.name)
        m = _HEAD_LAYER.search(node.name)
        if m:
            k = int(m.group(3)) + 1
            if not relu:
                raise UserError(f"the classifier reads projection-head layer {k} before its ReLU "
                                f"({' <- '.join(chain)}): fastclr cannot build that network")
            return k, "ema" if "ema_model/" in node.name else "online", chain
        if _BACKBONE.search(node.name) and (node.name.endswith("final_avg_pool") or node.op not in PASS_THROUGH):
            if relu:
                raise UserError(f"the classifier reads a ReLU of the backbone output ({' <- '.join(chain)}): "
                                f"fastclr cannot build that network")
            return 0, "ema" if "ema_model/" in node.name else "online", chain
        if node.op not in PASS_THROUGH or not node.input:
            raise UserError(f"cannot tell which layer the classifier reads: its input comes from {node.name} "
                            f"({node.op}), neither the backbone nor a projection-head layer")
        relu |= node.op == "Relu"
        name = _node_name(node.input[0])
    raise UserError("cannot tell which layer the classifier reads: the chain of its input is too long")


def _classifier_inputs(graph_def) -> Iterable[tuple[int, str, list[str]]]:
    nodes = {n.name: n for n in graph_def.node}
    for n in graph_def.node:
        if n.op == "MatMul" and _CLASSIFIER.search(n.name) and n.input:
            yield trace(nodes, n.input[0])


def classifier_input(folder: Path, prefix: Path) -> Optional[ClassifierInput]:
    """What the classifier of the release at ``prefix`` reads, from its first graph that builds one;
    None when no graph is there or none builds a classifier. A graph whose classifiers disagree (a
    training and an eval copy reading different layers) is a UserError: the answer would be a guess."""
    for file, graph_def in _graphs(folder, prefix):
        found = {(k, enc): chain for k, enc, chain in _classifier_inputs(graph_def)}
        if not found:
            continue
        if len(found) > 1:
            what = "; ".join(f"layer {k} ({enc})" for k, enc in found)
            raise UserError(f"{file.name}: the graph's classifiers read different layers ({what})")
        (k, enc), chain = next(iter(found.items()))
        return ClassifierInput(k, enc, f"{file.name}: {' <- '.join(chain[:4])}{' <- ...' if len(chain) > 4 else ''}")
    return None
