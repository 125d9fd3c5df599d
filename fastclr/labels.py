"""Labelled data for fine-tuning, distillation and linear evaluation: which images carry labels (all of
``data.path``, a ``data.file_list``, an official SimCLR list or a seeded class-balanced fraction),
their training loader, and the centre-crop evaluation loader. Input errors become one-line UserErrors.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import loaders
from fastclr import dist, runtime
from fastclr.config import SubsetConfig
from fastclr.runtime import UserError
from loaders import subsets
from loaders.config import DataConfig, LoaderConfig, loader_config
from loaders.sources.folders import find_classes
from loaders.sources.files import count_list

REPO = Path(__file__).resolve().parents[1]


def dataset_classes(path: str) -> list[str]:
    """Class names of an ImageFolder or of a .beton (from its manifest)."""
    if str(path).endswith(".beton"):
        try:
            return subsets.read_manifest(path)[1]
        except subsets.SubsetError as e:
            raise UserError(str(e)) from None
    try:
        return find_classes(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def resolve_subset_list(name: str) -> str:
    """An official list by path, else by name under ./imagenet_subsets or the repo's imagenet_subsets/."""
    p = Path(name)
    shared = REPO.parent / "shared" / "imagenet_subsets"  # where the dev checkouts keep the lists
    for cand in (p, REPO / p, REPO / "imagenet_subsets" / p.name, shared / p.name):
        if cand.is_file():
            return str(cand)
    raise UserError(f"subset list {name} not found (the official lists: "
                    f"https://github.com/google-research/simclr/tree/master/imagenet_subsets)")


def make_subset(train_path: str, sub: SubsetConfig):
    """(entries [(relpath, label)], .beton indices or None) of ``--subset.list`` / ``--subset.fraction``."""
    try:
        return subsets.make_subset(train_path, resolve_subset_list(sub.list) if sub.list else None,
                                   sub.fraction, sub.seed)
    except (subsets.SubsetError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def label_subset(data_cfg: DataConfig, sub: SubsetConfig, train_path: str,
                 out_dir: str) -> tuple[str | None, int | None]:
    """(file_list, number of images) of the labelled images: data.file_list as given, or the subset
    (list or fraction) written by rank 0 to out_dir/labels_subset.txt; (None, None) = all images."""
    chosen = [n for n, on in (("data.file_list", bool(data_cfg.file_list)), ("subset.list", bool(sub.list)),
                              ("subset.fraction", sub.fraction is not None)) if on]
    if len(chosen) > 1:
        raise UserError(f"give one label subset, not {' and '.join(chosen)}")
    if data_cfg.file_list:
        if not Path(data_cfg.file_list).is_file():
            raise UserError(f"data.file_list {data_cfg.file_list} not found")
        return data_cfg.file_list, count_list(data_cfg.file_list)
    if not chosen:
        return None, None
    out = os.path.join(out_dir, "labels_subset.txt")
    if dist.is_main():
        subsets.write_list(make_subset(train_path, sub)[0], out)
    dist.barrier()
    return out, count_list(out)


def build_loader(cfg: LoaderConfig, rank: int, world: int, device: torch.device):
    """loaders.build with its input errors (no images, batch larger than the data, ...) as UserError."""
    try:
        return loaders.build(cfg, rank=rank, world_size=world, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e).splitlines()[0]) from None


def eval_loader(path: str, data_cfg: DataConfig, batch_size: int, device: torch.device,
                file_list: str | None = None, backend: str = "torch"):
    """Centre-crop eval loader (in order, nothing dropped) over an ImageFolder or a list file."""
    n = count_list(file_list) if file_list else len(subsets.folder_entries(path))
    c = loader_config(data_cfg, backend=backend, path=path, file_list=file_list, augment="eval",
                      batch_size=max(1, min(batch_size, n)), train=False, dtype="float32")
    return build_loader(c, 0, 1, device)


def check_subset_honoured(loader, n_images: int | None, world: int, per_rank: int, backend: str) -> None:
    """A backend that ignored data.file_list would train on every label: refuse instead."""
    if n_images is None:
        return
    expected = (n_images // world) // per_rank
    if len(loader) != expected:
        raise UserError(f"data.backend={backend} did not apply the label subset ({len(loader)} steps/epoch, "
                        f"expected {expected} for {n_images} images): use data.backend=torch")


def train_loader(cfg, run: runtime.Run, file_list: str | None = None, n_images: int | None = None,
                 labels: bool = True):
    """The training loader of a finetune / distill / linear-eval run over ``file_list`` (None: every
    image of the train path), checked to honour the list. ``labels=False`` (distillation without the
    labelled term): any folder layout, every label -1."""
    data_cfg = loader_config(cfg.data, path=run.train_path, file_list=file_list, batch_size=run.per_rank,
                             train=True, seed=cfg.run.seed, dtype=runtime.dtype_name(run.dtype), labels=labels)
    loader = build_loader(data_cfg, run.rank, run.world, run.device)
    check_subset_honoured(loader, n_images, run.world, run.per_rank, cfg.data.backend)
    return loader


def val_loader(cfg, run: runtime.Run, classes: list[str]):
    """The centre-crop val loader on the main rank (None elsewhere, or without run.val_path); its classes
    must be the training classes."""
    if not (run.val_path and dist.is_main()):
        return None
    vloader = eval_loader(run.val_path, cfg.data, cfg.run.eval_batch_size, run.device)
    if vloader.classes != classes:
        raise UserError(f"val classes of {run.val_path} differ from the train classes of {run.train_path}")
    return vloader
