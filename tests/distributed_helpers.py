"""Workers for tests that run torch.distributed (gloo, CPU) in spawned processes. They live in
their own module so that the spawned children can import them by name."""

import os

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def entropy_quantile_worker(rank: int, world: int, port: int, inputs: list, out_dir: str) -> None:
    """grpo_loss with the entropy quantile taken over every rank: saves this rank's entropy mask
    (the private helper, as the loss uses it), loss, metrics and logprobs gradient."""
    from thinkfuse.grpo import _high_entropy_mask, grpo_loss

    init_gloo(rank, world, port)
    try:
        logprobs, old, advantages, mask, entropies, quantile = inputs[rank]
        entropy_mask = _high_entropy_mask(entropies, mask != 0, 1 - quantile, dist.group.WORLD)
        x = logprobs.clone().requires_grad_()
        loss, metrics = grpo_loss(x, old, advantages, mask, entropies=entropies, top_entropy_quantile=quantile,
                                  entropy_quantile_group=dist.group.WORLD, loss_type="dapo")
        loss.backward()
        torch.save({"mask": entropy_mask, "loss": loss.detach(), "grad": x.grad, "metrics": metrics},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
