"""The peers fastclr is measured against, in the same run: torchvision/PIL (the usual SimCLR
DataLoader), lightly's SimCLRTransform, and LARS as peers write it."""
from __future__ import annotations

import importlib

import torch

from benchmarks.plan import Plan
from loaders.augment.spec import simclr

LIGHTLY_MISSING = "lightly not installed (pip install 'fastclr[peers]')"


def torchvision_simclr_transform(size: int):
    """The SimCLR recipe as users write it with torchvision on PIL images (one view)."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode
    kernel = simclr(size=size).blur.kernel_size(size)  # 23 at 224 px
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
    ])


class TwoViewFolder(torch.utils.data.Dataset):
    """PIL ImageFolder yielding (view1, view2, label): ``transform`` makes one view (torchvision
    recipe), ``multi`` makes the list of views (lightly's SimCLRTransform)."""

    def __init__(self, samples, transform=None, multi=None):
        self.samples, self.transform, self.multi = samples, transform, multi

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        views = self.multi(img) if self.multi is not None else [self.transform(img), self.transform(img)]
        return views[0], views[1], label


def peer_loader(kind: str, samples, plan: Plan, device):
    if kind == "torchvision":
        ds = TwoViewFolder(samples, transform=torchvision_simclr_transform(plan.size))
    else:
        from lightly.transforms import SimCLRTransform
        # The same recipe: blur on (p 0.5, sigma 0.1-2), no mean/std normalization (fastclr's default).
        ds = TwoViewFolder(samples, multi=SimCLRTransform(input_size=plan.size, gaussian_blur=0.5, normalize=None))
    return torch.utils.data.DataLoader(ds, batch_size=plan.batch, shuffle=True, drop_last=True,
                                       num_workers=plan.workers, persistent_workers=plan.workers > 0,
                                       pin_memory=torch.device(device).type == "cuda")


class NaiveLARS:
    """LARS as peers write it: a readable Python loop over parameters with a ``.item()`` per norm
    (each one a host sync on the GPU). TF semantics, like fastclr's mode="tf"; the reference the
    fused step is measured against."""

    def __init__(self, params, lr, momentum, weight_decay, eta):
        self.params, self.lr, self.m, self.wd, self.eta = list(params), lr, momentum, weight_decay, eta
        self.bufs = [torch.zeros_like(q) for q in self.params]

    @torch.no_grad()
    def step(self):
        for q, buf in zip(self.params, self.bufs):
            g = q.grad
            trust = 1.0
            if q.ndim > 1:  # BN and bias excluded from decay and adaptation
                g = g.add(q, alpha=self.wd)
                w_norm = q.norm().item()
                g_norm = g.norm().item()
                if w_norm > 0 and g_norm > 0:
                    trust = self.eta * w_norm / g_norm
            buf.mul_(self.m).add_(g, alpha=self.lr * trust)
            q.sub_(buf)


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False
