"""Training helpers around the optimizers: bf16 models with chosen modules kept in fp32, stochastic bf16
gradient accumulation over micro-batches, a guard against learning rates too small for bf16 weights, and a
whole training step (forward, backward, step) compiled as one graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from optgen.codecs.rng import torch_key, torch_random16
from optgen.codecs.rounding import torch_round_bf16

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def cast_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
               keep_fp32: Callable[[str, nn.Module], bool] | Iterable[str] | None = None,
               keep_norms: bool = True) -> nn.Module:
    """Cast a model's parameters and floating buffers to ``dtype``, except the modules kept in fp32.

    ``keep_fp32`` is a predicate ``(qualified name, module)`` or a list of qualified module names; with
    ``keep_norms`` the normalization layers stay fp32 too. A kept module gets its floating inputs cast to
    fp32 and its floating outputs cast back to ``dtype``. Tied parameters stay one tensor. Returns the model.
    """
    if keep_fp32 is None:
        names: set[str] = set()
        predicate: Callable[[str, nn.Module], bool] = lambda name, m: name in names
    elif callable(keep_fp32):
        predicate = keep_fp32
    else:
        names = set(keep_fp32)
        predicate = lambda name, m: name in names
    kept = {name for name, m in model.named_modules()
            if predicate(name, m) or (keep_norms and isinstance(m, NORM_LAYERS))}

    def inside_kept(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in kept if k)

    for name, module in model.named_modules():
        if inside_kept(name) or ("" in kept and name == ""):
            continue
        for key, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # in place on the Parameter object: ties stay tied
        for key, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                module._buffers[key] = b.to(dtype)

    def cast_tree(x: Any, to: torch.dtype) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(to)
        if isinstance(x, (tuple, list)):
            return type(x)(cast_tree(v, to) for v in x)
        return x

    for name in kept:
        if name and not any(name != k and name.startswith(k + ".") for k in kept if k):  # outermost kept only
            module = model.get_submodule(name)
            module.register_forward_pre_hook(lambda m, args: cast_tree(args, torch.float32))
            module.register_forward_hook(lambda m, args, out: cast_tree(out, dtype))
    return model


class StochasticAccumulator:
    """Accumulate micro-batch gradients of bf16 parameters in bf16 with stochastic rounding (torchastic).

    A post-accumulate-grad hook takes each new gradient: the first micro-batch's is kept as is, later ones
    are added in fp32 and stochastically rounded back to bf16 (unbiased, so many small gradients do not
    vanish as they do with round-to-nearest). ``p.grad`` is freed after each hook; call
    ``reassign_grad_buffer()`` before ``optimizer.step()`` to put the sums into ``p.grad``. The random bits
    come from the counter-based hash of optgen.codecs.rounding (seed, micro-batch, parameter index).
    """

    def __init__(self, params: Iterable[torch.Tensor], seed: int = 0) -> None:
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if p.dtype != torch.bfloat16:
                raise ValueError(f"StochasticAccumulator is for bf16 parameters, got {p.dtype}")
        self.seed = seed
        self.buffers: dict[int, torch.Tensor] = {}
        self._calls = [0] * len(self.params)  # the hash counter: one stream per parameter and call
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def accumulate(p: torch.Tensor) -> None:
            g = p.grad
            acc = self.buffers.get(index)
            if acc is None:
                self.buffers[index] = g.detach().clone()
            else:
                total = acc.float().reshape(-1) + g.float().reshape(-1)
                self._calls[index] += 1
                rng = torch.tensor([self.seed, self._calls[index]], dtype=torch.int64, device=g.device)
                noise = torch_random16(torch_key(rng, index, 0x5EED), total.numel(), g.device)
                acc.copy_(torch_round_bf16(total, noise).to(torch.bfloat16).view(acc.shape))
            p.grad = None
        return accumulate

    def reassign_grad_buffer(self) -> None:
        """Move the accumulated sums into ``p.grad`` and start a new accumulation."""
        for index, p in enumerate(self.params):
            if index in self.buffers:
                p.grad = self.buffers.pop(index)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def check_numerics(optimizer: torch.optim.Optimizer, action: str = "warn") -> list[str]:
    """Warn (or raise, ``action="raise"``) for bf16/fp16 parameters stored without an error-correction term or
    stochastic rounding whose learning rate is too small to move them: lr below half an ULP of 1 in their
    dtype (2^-9 for bf16), so typical updates of weights of magnitude ~1 round back to the same value.
    Returns the messages."""
    messages = []
    variants = getattr(optimizer, "variants", None)
    for gi, group in enumerate(optimizer.param_groups):
        lr = float(group["lr"])
        for p in group["params"]:
            if p.dtype not in (torch.bfloat16, torch.float16):
                continue
            if variants is not None:
                layout = variants[optimizer.variant_of(p)]
                if any(b.key is not None and b.key.startswith("p_") for b in layout.buffers) or layout.needs_rng:
                    continue  # an ECC/Kahan side buffer or stochastic rounding keeps small updates
            half_ulp = torch.finfo(p.dtype).eps / 2
            if lr < half_ulp:
                messages.append(f"param group {gi}: lr {lr:g} is below half an ULP of 1 in {p.dtype} ({half_ulp:g}); "
                                f"updates to weights of magnitude ~1 are lost (use an ECC or stochastic-rounding "
                                f"spec such as FlashAdamW or StochasticAdamW)")
                break
    if messages and action == "raise":
        raise ValueError("; ".join(messages))
    for m in messages:
        warnings.warn(m, stacklevel=2)
    return messages


def compile_training_step(fn: Callable[..., Any], **compile_kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True)`` for a whole training step: forward, ``loss.backward()``, the optgen
    optimizer's ``step()`` and ``zero_grad()`` in one graph. ``fn`` must return detached tensors (``loss.detach()``).

    Dynamo traces ``backward()`` only with ``trace_autograd_ops``, set here while ``fn`` is compiled (no global
    change). Give the optimizer a tensor ``lr`` so that a schedule changes it in place and causes no recompile.
    ``compile_kwargs`` go to torch.compile. Known wart: the optimizer cannot record, inside the graph, that step()
    ran, so an LR scheduler's first ``step()`` warns, wrongly, that it ran before ``optimizer.step()``.
    """
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        raise RuntimeError(f"compiling backward into the training step needs torch._dynamo.config.trace_autograd_ops, "
                           f"which torch {torch.__version__} lacks; compile the forward and the optimizer step apart")
    compiled = torch.compile(fn, fullgraph=True, **compile_kwargs)
    return torch._dynamo.config.patch(trace_autograd_ops=True)(compiled)
