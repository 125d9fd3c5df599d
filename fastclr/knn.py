"""k-NN evaluation of a backbone: cosine similarity, k nearest train features vote with weight
exp(sim / T) (the weighted k-NN of Wu et al. 2018, used by the SSL literature as a quick probe).

Used at the end of pretraining to show that learning happened: the same k-NN on the same images
for the trained backbone and for that backbone at its random initialization."""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

import loaders
from fastclr.metrics import extract
from loaders.common import list_image_folder


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


def balanced_list(root: str, n: int, seed: int, out_path: str) -> str:
    """Write a 'relpath label' list of up to n images of root, class-balanced, seeded."""
    samples, _ = list_image_folder(root)
    labels = np.array([lab for _, lab in samples])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes])
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        for i in sorted(keep):
            fh.write(f"{os.path.relpath(samples[i][0], root)} {samples[i][1]}\n")
    return out_path


def knn_report(backbone, init_state: Optional[Dict[str, torch.Tensor]], train_path: str, val_path: str, cfg,
               device, dtype) -> Dict[str, float]:
    """k-NN top-1 of the trained backbone and of the same backbone at random init (rank 0 only)."""
    from fastclr import dist
    if not dist.is_main():
        return {}
    run = cfg.run
    lists = {split: balanced_list(path, n, cfg.run.seed, os.path.join(run.out_dir, f"knn_{split}.txt"))
             for split, path, n in (("train", train_path, run.knn_train_size), ("val", val_path, run.knn_val_size))}

    def loader_for(split, path):
        c = dataclasses.replace(cfg.data, path=path, file_list=lists[split], augment="eval", train=False,
                                batch_size=256, dtype="float32", backend="torch")
        return loaders.build(c, rank=0, world_size=1, device=device)

    def score(net):
        """k-NN top-1 of a backbone's features (None: the raw pixels), L2-normalized (cosine)."""
        if net is not None:
            net.eval()
        (tf, ty), (vf, vy) = (extract(net, loader_for(split, path), device, dtype, cfg.model.channels_last)
                              for split, path in (("train", train_path), ("val", val_path)))
        return knn_top1(F.normalize(tf, dim=1), ty, F.normalize(vf, dim=1), vy)

    # Three scores on the same images: the trained backbone, the same backbone at its random init
    # (BN with its initial running statistics, so its features are nearly degenerate), and raw pixels.
    out = {"knn_top1": score(backbone), "knn_top1_raw_pixels": score(None)}
    if init_state is not None:
        random_net = copy.deepcopy(backbone)
        prefix = "backbone."
        random_net.load_state_dict({k[len(prefix):]: v for k, v in init_state.items() if k.startswith(prefix)})
        out["knn_top1_random_init"] = score(random_net)
    backbone.train()
    return out
