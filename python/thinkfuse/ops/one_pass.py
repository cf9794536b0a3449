"""A scalar loss whose input gradients are formed in its forward pass.

Losses over the lm_head's log-probs whose gradient w.r.t. each token's log-prob depends on that
log-prob alone (cross-entropy, GRPO) can turn each chunk of logits into d hidden / d weight as
soon as it is formed (``ops.logprobs.fused_linear_logprobs_with_grads``): 3 matmuls per chunk
instead of the 4 of a forward plus a backward that recomputes the logits. ``one_pass_loss`` wraps
such a computation for autograd: the gradients are held from the forward to the backward, which
only scales them, in place, by the loss's upstream gradient (so the loss can be differentiated
once: a second backward raises).
"""

from __future__ import annotations

import torch


def one_pass_applies() -> bool:
    """Whether a loss that needs a gradient may take the one-pass form here: not while
    torch.compile traces (the held gradients are eager state) nor under a torch.func transform
    (its autograd.Function decides in its forward which gradients to form, from
    ``needs_input_grad``, which the setup_context style torch.func needs cannot see). The
    callers then differentiate the fused log-prob op, which takes both."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def one_pass_loss(hidden, weight, bias, compute):
    """``compute(weight_grad) -> (loss, d_hidden, d_weight, d_bias)`` as a differentiable scalar
    of (hidden, weight, bias); ``weight_grad`` says whether d_weight / d_bias are needed."""
    return _OnePassLoss.apply(hidden, weight, bias, compute)


class _OnePassLoss(torch.autograd.Function):
    """A scalar loss whose input gradients ``compute`` forms in the forward; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, compute):
        weight_grad = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        loss, d_hidden, d_weight, d_bias = compute(weight_grad)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.weight_grad, ctx.has_bias, ctx.consumed = weight_grad, bias is not None, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            # create_graph=True (double backward, Hessian-vector products): the held gradients
            # carry no graph, so their own derivatives would silently be missing.
            raise RuntimeError(
                "a one-pass loss (thinkfuse GRPOLoss / causal_lm_loss / patch_model's loss rule) has no second "
                "derivative (backward with create_graph=True); for a patched model's loss use "
                "patch_model(model, loss=False) (the fused log-prob ops have none either)"
            )
        # The gradients are scaled in place and handed to autograd: a copy would double the
        # d_weight memory ([V, H]) at the very moment the optimizer's gradients are also alive.
        # That is why the loss can be differentiated once.
        if ctx.consumed:
            raise RuntimeError(
                "a one-pass loss (thinkfuse GRPOLoss / causal_lm_loss) can be differentiated only once; "
                "its gradients were formed in the forward and have been handed out already"
            )
        ctx.consumed = True
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        scale = lambda t: t.mul_(grad_loss.to(t.dtype))  # noqa: E731
        return (
            scale(d_hidden) if ctx.needs_input_grad[0] else None,
            scale(d_weight) if ctx.weight_grad and ctx.needs_input_grad[1] else None,
            scale(d_bias) if ctx.weight_grad and ctx.has_bias and ctx.needs_input_grad[2] else None,
            None,
        )
