"""One rank of the 2-process CPU test (tests/test_dist.py starts two of these, as torchrun would).

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment, initializes
gloo through fastclr.dist.init(), runs every case and saves what this rank saw to OUT/rank{r}.pt.
The test process compares against one process on the concatenated global batch.

Usage: python tests/_dist_worker.py OUT_DIR
"""
import sys

import torch

from fastclr import dist as fdist
from fastclr.losses import MomentumQueue, contrastive_accuracy, nt_xent

B, D = 4, 8  # per rank
# name -> (dtype, temperature, chunk_size, number of extra negatives)
CASES = {
    "dense": (torch.float64, 0.2, 0, 0),
    "chunked": (torch.float64, 0.2, 3, 0),  # 16 columns in chunks of 3: not divisible
    "dense_extra": (torch.float64, 0.5, 0, 5),
    "chunked_extra": (torch.float64, 0.5, 6, 5),
    "float32": (torch.float32, 0.1, 0, 0),
    "float32_chunked": (torch.float32, 0.1, 5, 0),
}


def global_inputs(name, world):
    """The same global batch on every rank (and in the test process): z1, z2 [W*B, D], extra [K, D]."""
    dtype, _, _, k = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    z1 = torch.randn(world * B, D, generator=g, dtype=torch.float64)
    z2 = z1 + 0.8 * torch.randn(world * B, D, generator=g, dtype=torch.float64)
    extra = torch.nn.functional.normalize(torch.randn(k, D, generator=g, dtype=torch.float64), dim=1) if k else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(z1), cast(z2), cast(extra)


def main(out_dir):
    info = fdist.init()
    rank, world = info
    result = {"info": tuple(info), "rank": fdist.rank(), "world_size": fdist.world_size(),
              "local_rank": fdist.local_rank(), "is_main": fdist.is_main()}

    for name, (_, t, chunk, _) in CASES.items():
        z1g, z2g, extra = global_inputs(name, world)
        z1 = z1g[rank * B:(rank + 1) * B].clone().requires_grad_()
        z2 = z2g[rank * B:(rank + 1) * B].clone().requires_grad_()
        loss, acc = nt_xent(z1, z2, t, chunk_size=chunk, extra_negatives=extra, return_accuracy=True)
        loss.backward()
        result[name] = {"loss": loss.detach(), "acc": acc, "grad_z1": z1.grad, "grad_z2": z2.grad,
                        "mean_loss": fdist.all_reduce_mean(loss),
                        "tf_acc": contrastive_accuracy(z1.detach(), z2.detach(), chunk=chunk or 4096)}

    result["gathered"] = fdist.gather_nograd(torch.full((2, 3), float(rank)))
    result["mean"] = fdist.all_reduce_mean(torch.tensor(float(rank + 1)))

    # memory queue fed with all ranks' keys: every rank must hold the same queue
    torch.manual_seed(0)
    mq = MomentumQueue(torch.nn.Linear(D, 3), dim=3, size=10)
    for step in range(3):
        keys = torch.nn.functional.normalize(torch.randn(B, 3) + rank + 10 * step, dim=1)
        mq.enqueue(fdist.gather_nograd(keys))
    result["queue"], result["ptr"] = mq.queue.clone(), mq.ptr.clone()

    fdist.barrier()
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    fdist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
