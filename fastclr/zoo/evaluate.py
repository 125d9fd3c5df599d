"""Top-1/top-5 and top-k predictions of a classifier (a converted release, or any finetune.py / distill.py
checkpoint) with the official TF1 eval preprocessing (``loaders.augment.geometry.tf_eval_view``: 0.875 centre
crop, float bicubic resize as TF1 computes it, [0, 1] inputs, no mean/std)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from fastclr import runtime
from fastclr.runtime import UserError
from loaders.sources.folders import IMG_EXTENSIONS, list_image_folder, read_file_list
from loaders.sources.decode import read_rgb
from loaders.augment.geometry import tf_eval_view


class EvalImages(Dataset):
    """(float32 [3, S, S] view, label, index) per listed file; an unreadable file gives label -2 and a
    zero view, and is counted apart rather than stopping a 50,000-image pass."""

    def __init__(self, samples: Sequence[Tuple[str, int]], size: int):
        self.samples, self.size = list(samples), size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            view = tf_eval_view(read_rgb(path, exif=False), self.size)  # TF's decode_jpeg ignores EXIF
        except Exception:  # noqa: BLE001  (a broken file: reported by name after the pass)
            return torch.zeros(3, self.size, self.size), -2, i
        return torch.from_numpy(view), label, i


def labelled_samples(path: str, file_list: Optional[str]) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples, classes) of an ImageFolder, or of a 'relpath [label]' list file under it."""
    try:
        if file_list:
            return read_file_list(file_list, path)
        return list_image_folder(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{e}: give an ImageFolder (VAL_DIR/<class>/<image>, classes sorted as the model's "
                        f"labels, e.g. the 1000 ImageNet synset folders) or --data.file_list") from None


def image_files(inputs: Sequence[str]) -> List[str]:
    """The image files among ``inputs`` (files, or folders searched recursively), in a stable order."""
    out: List[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS and f.is_file())
        elif p.is_file():
            out.append(str(p))
        else:
            raise UserError(f"no such file or folder: {item}")
    if not out:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {', '.join(inputs)}")
    return out


def _loader(samples, size: int, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(EvalImages(samples, size), batch_size=batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def _forward(model, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), runtime.autocast(device, dtype):
        return model(x).float()


def evaluate(model, samples, size: int, batch_size: int, workers: int, device: torch.device,
             dtype: torch.dtype, progress: bool = True) -> Dict[str, object]:
    """top-1 / top-5 (%) over ``samples`` [(path, label)], counts kept on the device; unreadable files
    are left out and named."""
    from tqdm import tqdm
    hit1 = torch.zeros((), device=device, dtype=torch.long)
    hit5 = torch.zeros((), device=device, dtype=torch.long)
    n, bad = 0, []
    bar = tqdm(total=len(samples), unit="img", disable=not progress, dynamic_ncols=True)
    for x, y, idx in _loader(samples, size, batch_size, workers, device):
        ok = y >= 0
        bad += [samples[int(i)][0] for i in idx[~ok]]
        logits = _forward(model, x, device, dtype)[ok.to(device)]
        y = y[ok].to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 += (top[:, 0] == y).sum()
        hit5 += (top == y[:, None]).any(1).sum()
        n += int(ok.sum())
        bar.update(len(x))
        if progress and n:
            bar.set_postfix(top1=f"{100.0 * hit1.item() / n:.2f}")  # a host sync per batch, for the bar only
    bar.close()
    if n == 0:
        raise UserError(f"none of the {len(samples)} images could be read (first: {bad[0] if bad else '-'})")
    return {"top1": round(100.0 * hit1.item() / n, 3), "top5": round(100.0 * hit5.item() / n, 3),
            "images": n, "unreadable": bad}


def predict(model, files: Sequence[str], size: int, batch_size: int, workers: int, device: torch.device,
            dtype: torch.dtype, k: int) -> Tuple[List[Tuple[str, List[Tuple[int, float]]]], List[str]]:
    """([(file, [(class index, probability), ...k])], unreadable files)."""
    out, bad = [], []
    for x, y, idx in _loader([(f, 0) for f in files], size, batch_size, workers, device):
        probs = _forward(model, x, device, dtype).softmax(1).cpu()
        p, c = probs.topk(min(k, probs.shape[1]), dim=1)
        for row, i in enumerate(idx.tolist()):
            if int(y[row]) < 0:
                bad.append(files[i])
                continue
            out.append((files[i], list(zip(c[row].tolist(), p[row].tolist()))))
    return out, bad


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def as_names(state: dict, num_classes: int) -> List[str]:
    """Display names of a classifier's outputs: its stored class names, its training classes, the
    ImageNet names for a 1000-way model, else the indices."""
    names = state.get("class_names") or state.get("classes")
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        from fastclr.zoo.convert import imagenet_class_names
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]
