"""The probes pretraining ends with: k-NN (cosine similarity, the k nearest train features vote with
weight exp(sim / T): the weighted k-NN of Wu et al. 2018, the SSL literature's quick probe) and a
linear probe trained on few labels (logistic regression on frozen features: the paper's claim, label
efficiency, in one number).

Both run on the same images for the trained backbone, for that backbone at its random
initialization, and for the raw pixels (the reference a learned feature must beat), with the same
protocol for all three."""
from __future__ import annotations

import copy
import os
import random
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

import loaders
from loaders.config import loader_config
from fastclr.metrics import extract
from loaders.sources.files import atomic_write_text, count_list, read_list
from loaders.sources.folders import list_image_folder


@torch.no_grad()
def knn_top1(train_f, train_y, val_f, val_y, k: int = 20, t: float = 0.07, num_classes: Optional[int] = None,
             chunk: int = 1024) -> float:
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    correct = 0
    for s in range(0, len(val_f), chunk):
        sim = val_f[s:s + chunk] @ train_f.T                      # [q, N]
        top, idx = sim.topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(top), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (top / t).exp())
        correct += (votes.argmax(1) == val_y[s:s + chunk]).sum().item()
    return correct / len(val_f)


def linear_probe_top1(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                      l2: float = 1e-3, max_iter: int = 300, num_classes: Optional[int] = None) -> float:
    """Top-1 on val of a multinomial logistic regression trained on ``train_f`` (standardized with
    the train statistics; L-BFGS to convergence with an l2 penalty ``l2 * |W|^2``): deterministic and
    the same for learned features and for raw pixels."""
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    x, v = (train_f - mu) / sd, (val_f - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_y) + l2 * w.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (v @ w + b).argmax(1).eq(val_y).float().mean().item()


def first_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first ``n`` samples of every class (in order): a fixed labelled subset."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:n] for c in labels.unique()])


def balanced_list(root: str, n: int, seed: int, out_path: str, exclude: frozenset = frozenset()) -> str:
    """Write a 'relpath label' list of up to n images of root (not in ``exclude``: relpaths), class-
    balanced, seeded."""
    samples, _ = list_image_folder(root)
    samples = [s for s in samples if os.path.relpath(s[0], root) not in exclude]
    labels = np.array([lab for _, lab in samples])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes])
    atomic_write_text(out_path, "".join(f"{os.path.relpath(samples[i][0], root)} {samples[i][1]}\n"
                                        for i in sorted(keep)))
    return out_path


class KnnProbe:
    """The k-NN probe's images, chosen once: a class-balanced bank of ``bank_size`` images and up to
    ``query_size`` scored images of ``val_path``. The bank comes from the training folder
    (``run.knn_bank=train``: its class folders label it) or from ``val_path`` itself
    (``run.knn_bank=val``: for training data without labels; bank and queries are then disjoint).
    The lists are written to ``out_dir/knn_<tag>_{bank,val}.txt``; ``top1(net)`` scores a backbone."""

    def __init__(self, cfg, train_path: str, val_path: str, bank_size: int, query_size: int, tag: str, device,
                 dtype):
        run = cfg.run
        bank_root = train_path if run.knn_bank == "train" else val_path
        if run.knn_bank == "val":  # at most half of the val images, so that the other half is scored
            bank_size = min(bank_size, len(list_image_folder(val_path)[0]) // 2)
        self.bank = (bank_root, balanced_list(bank_root, bank_size, run.seed,
                                              os.path.join(run.out_dir, f"knn_{tag}_bank.txt")))
        taken = frozenset(rel for rel, _ in read_list(self.bank[1])) if run.knn_bank == "val" else frozenset()
        self.queries = (val_path, balanced_list(val_path, query_size, run.seed + (run.knn_bank == "val"),
                                                os.path.join(run.out_dir, f"knn_{tag}_val.txt"), exclude=taken))
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.loaders = [self._loader(*where) for where in (self.bank, self.queries)]

    def _loader(self, path: str, file_list: str):
        c = loader_config(self.cfg.data, path=path, file_list=file_list, augment="eval", backend="torch",
                          train=False, batch_size=max(1, min(256, count_list(file_list))), dtype="float32")
        return loaders.build(c, rank=0, world_size=1, device=self.device)

    def features(self, net):
        """((bank features, labels), (query features, labels)) of a backbone (None: raw pixels)."""
        if net is not None:
            net.eval()
        return [extract(net, ld, self.device, self.dtype, self.cfg.model.channels_last) for ld in self.loaders]

    def top1(self, net) -> float:
        """k-NN top-1 (a fraction) of ``net``'s L2-normalized features; the network is left in eval mode."""
        (tf, ty), (vf, vy) = self.features(net)
        return knn_top1(F.normalize(tf, dim=1), ty, F.normalize(vf, dim=1), vy)


def online_knn(probe: KnnProbe, backbone):
    """The trainer's monitor while pretraining runs (rank 0): the k-NN top-1 of the current backbone as an
    ``eval`` record (``top1`` in %, like the classifiers' val top-1). The RNG streams are left as they
    were, so a run with the monitor trains exactly like one without it."""
    def monitor(step: int) -> dict:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            state = (random.getstate(), np.random.get_state())
            top1 = probe.top1(backbone)
            random.setstate(state[0])
            np.random.set_state(state[1])
        backbone.train()
        return {"metric": "k-NN", "top1": round(100 * top1, 3), "knn_bank": len(probe.loaders[0].samples),
                "val_images": len(probe.loaders[1].samples), "seconds": round(time.perf_counter() - t0, 2)}
    return monitor


def knn_report(backbone, init_state: Optional[Dict[str, torch.Tensor]], train_path: str, val_path: str, cfg,
               device, dtype) -> Dict[str, float]:
    """k-NN top-1 of the trained backbone and of the same backbone at random init (rank 0 only)."""
    from fastclr import dist
    if not dist.is_main():
        return {}
    run = cfg.run
    probe = KnnProbe(cfg, train_path, val_path, run.knn_train_size, run.knn_val_size, "final", device, dtype)

    def score(net, name):
        """k-NN top-1 of a backbone's features (None: the raw pixels), L2-normalized (cosine), and the
        linear probe on the first ``run.probe_labels_per_class`` bank images of every class."""
        (tf, ty), (vf, vy) = probe.features(net)
        out[f"knn_top1{name}"] = knn_top1(F.normalize(tf, dim=1), ty, F.normalize(vf, dim=1), vy)
        if run.probe_labels_per_class:
            few = first_per_class(ty, run.probe_labels_per_class)
            out[f"probe_top1{name}"] = linear_probe_top1(tf[few].cpu(), ty[few].cpu(), vf.cpu(), vy.cpu())
            out["probe_labels"] = len(few)

    # Three scores on the same images: the trained backbone, the same backbone at its random init
    # (BN with its initial running statistics, so its features are nearly degenerate), and raw pixels.
    out: Dict[str, float] = {}
    score(backbone, "")
    score(None, "_raw_pixels")
    if init_state is not None:
        random_net = copy.deepcopy(backbone)
        prefix = "backbone."
        random_net.load_state_dict({k[len(prefix):]: v for k, v in init_state.items() if k.startswith(prefix)})
        score(random_net, "_random_init")
    backbone.train()
    return out
