"""The released SimCLR models: what google-research/simclr published, as facts from its README.

SimCLRv2 (README, "Pre-trained models for SimCLRv2", the table of Table 1 of arXiv 2006.10029): 13
architectures, each released five times (``KINDS_V2``) as TF1 checkpoints under
``gs://simclr-checkpoints/simclrv2/<kind>/<name>/``, plus distilled / self-trained models under
``distill_1pct`` and ``distill_10pct``. SimCLRv1 (README, "Pre-trained models for SimCLRv1"): ResNet-50
1x / 2x / 4x with a linear-eval head and no projection head, under ``gs://simclr-checkpoints/simclrv1``.

The parameter counts of the table are the paper's; ``fastclr.zoo list`` prints them next to the count
of fastclr's own backbone of the same architecture, which a test holds to the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BUCKET = "simclr-checkpoints"
GCS = f"gs://{BUCKET}"
HTTPS = f"https://storage.googleapis.com/{BUCKET}"

KINDS_V2 = ("pretrained", "finetuned_1pct", "finetuned_10pct", "finetuned_100pct", "supervised")
KINDS_DISTILL = ("distill_1pct", "distill_10pct")
KINDS_V1 = ("pretrain", "finetune_10pct", "finetune_100pct")

# What each kind's classifier is, in the release's words.
KIND_TEXT = {
    "pretrained": "SimCLRv2 pretrained, with a linear-eval head",
    "finetuned_1pct": "fine-tuned on 1 % of the ImageNet labels",
    "finetuned_10pct": "fine-tuned on 10 % of the labels",
    "finetuned_100pct": "fine-tuned on 100 % of the labels",
    "supervised": "supervised baseline of the same architecture",
    "distill_1pct": "distilled / self-trained after fine-tuning on 1 % (where the bucket holds this architecture)",
    "distill_10pct": "distilled / self-trained after fine-tuning on 10 % (where the bucket holds this architecture)",
    "pretrain": "SimCLRv1 pretrained, with a linear-eval head",
    "finetune_10pct": "SimCLRv1 fine-tuned on 10 % of the labels",
    "finetune_100pct": "SimCLRv1 fine-tuned on 100 % of the labels",
}

# The official top-1 (%) of each kind, by the column of the release table it comes from.
TOP1_COLUMNS = {"finetuned_1pct": "ft_1pct", "finetuned_10pct": "ft_10pct", "finetuned_100pct": "ft_100pct",
                "pretrained": "linear_eval", "supervised": "supervised", "pretrain": "linear_eval"}


@dataclass(frozen=True)
class Release:
    """One released architecture: its name (the release's folder name), the official figures, and
    where its checkpoints are."""
    name: str                      # r152_3x_sk1 (v2) or r50_4x (v1)
    family: str                    # "v2" or "v1"
    depth: int
    width: int
    sk: bool
    params_m: int                  # backbone parameters, millions, as the release table gives them
    top1: dict = field(default_factory=dict)   # column -> official ImageNet top-1 (%)

    @property
    def sk_ratio(self) -> float:
        return 0.0625 if self.sk else 0.0

    @property
    def kinds(self) -> tuple:
        return KINDS_V2 + KINDS_DISTILL if self.family == "v2" else KINDS_V1

    def path(self, kind: str) -> str:
        """The release folder of one kind, below the bucket (``simclrv2/finetuned_1pct/r50_1x_sk0``)."""
        if kind not in self.kinds:
            raise ValueError(f"{self.name} has no {kind!r} release (kinds: {', '.join(self.kinds)})")
        if self.family == "v2":
            return f"simclrv2/{kind}/{self.name}"
        return f"simclrv1/{kind}/{self.name.split('_')[1]}"


def _v2(depth, width, sk, params, ft1, ft10, ft100, linear, supervised) -> Release:
    return Release(f"r{depth}_{width}x_sk{int(sk)}", "v2", depth, width, sk, params,
                   {"ft_1pct": ft1, "ft_10pct": ft10, "ft_100pct": ft100, "linear_eval": linear,
                    "supervised": supervised})


# google-research/simclr README: Depth, Width, SK, Param (M), F-T (1%), F-T (10%), F-T (100%),
# Linear eval, Supervised.
V2 = (
    _v2(50, 1, False, 24, 57.9, 68.4, 76.3, 71.7, 76.6),
    _v2(50, 1, True, 35, 64.5, 72.1, 78.7, 74.6, 78.5),
    _v2(50, 2, False, 94, 66.3, 73.9, 79.1, 75.6, 77.8),
    _v2(50, 2, True, 140, 70.6, 77.0, 81.3, 77.7, 79.3),
    _v2(101, 1, False, 43, 62.1, 71.4, 78.2, 73.6, 78.0),
    _v2(101, 1, True, 65, 68.3, 75.1, 80.6, 76.3, 79.6),
    _v2(101, 2, False, 170, 69.1, 75.8, 80.7, 77.0, 78.9),
    _v2(101, 2, True, 257, 73.2, 78.8, 82.4, 79.0, 80.1),
    _v2(152, 1, False, 58, 64.0, 73.0, 79.3, 74.5, 78.3),
    _v2(152, 1, True, 89, 70.0, 76.5, 81.3, 77.2, 79.9),
    _v2(152, 2, False, 233, 70.2, 76.6, 81.1, 77.4, 79.1),
    _v2(152, 2, True, 354, 74.2, 79.4, 82.9, 79.4, 80.4),
    _v2(152, 3, True, 795, 74.9, 80.1, 83.1, 79.8, 80.5),
)

# google-research/simclr README, SimCLRv1 table (linear eval); parameter counts from the SimCLR paper
# (arXiv 2002.05709, Table 6: R50 24M, R50 (2x) 94M, R50 (4x) 375M).
V1 = (
    Release("r50_1x", "v1", 50, 1, False, 24, {"linear_eval": 69.1}),
    Release("r50_2x", "v1", 50, 2, False, 94, {"linear_eval": 74.2}),
    Release("r50_4x", "v1", 50, 4, False, 375, {"linear_eval": 76.6}),
)
# The v1 README links these zip files (checkpoint + TF-Hub module of the pretrained models).
V1_ZIPS = {r.name: f"https://storage.cloud.google.com/simclr-gcs/checkpoints/ResNet50_{r.width}x.zip" for r in V1}

RELEASES = {r.name: r for r in V2 + V1}


def find(name: str) -> Release:
    """The release called ``name`` (r50_1x_sk0, r152_3x_sk1, r50_4x, ...); ValueError naming the choices."""
    if name in RELEASES:
        return RELEASES[name]
    raise ValueError(f"no released model {name!r}; released: {', '.join(RELEASES)}")
