"""What every stage reads: the arguments, the plan, the data and the device of one run (or one
sweep point)."""
from __future__ import annotations

import torch

from benchmarks.data import Data
from benchmarks.plan import Plan


class Bench:
    def __init__(self, args, plan: Plan, data: Data):
        self.args, self.plan, self.data = args, plan, data
        self.device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self._bytes = None

    def encoded(self) -> list[bytes]:
        if self._bytes is None:
            self._bytes = []
            for p in self.data.subset(self.plan.stage_images):
                with open(p, "rb") as f:
                    self._bytes.append(f.read())
        return self._bytes

    def need_folder(self):
        return None if self.data.folder else self.data.folder_why
