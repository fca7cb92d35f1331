"""``torch.compile`` for training, without compile prefixes in saved weights and without recompiles.

``torch.compile(model)`` returns a wrapper whose ``state_dict`` keys start with ``_orig_mod.``; the module itself
is its ``_orig_mod``. The trainer saves, loads and evaluates that plain module (``uncompiled``), so checkpoints,
``model_final.pth`` and the logged model have the keys of an uncompiled run, and a run may resume with
``TRAIN.COMPILE`` switched on or off.
"""

import torch
from torch import nn

from ptengine.config.registry import Registry

# The torch.compile backends that work with torch alone (torch also lists tvm and openxla, which need packages of
# their own and would fail at the first step): generated kernels, CUDA graphs, and the two debugging ones.
COMPILE_BACKEND_REGISTRY = Registry("TRAIN.COMPILE_BACKEND",
                                    {name: name for name in ("inductor", "cudagraphs", "eager", "aot_eager")})


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``model`` (plain, or wrapped in DDP: compile the wrapper, as PyTorch recommends) compiled for training.

    Recompiles are avoided by three choices:
    - ``dynamic=False``: each input shape gets one static graph, compiled the first time it is seen: the full
      batch, then the epoch's last, smaller batch (the same size every epoch). The default (``dynamic=None``)
      would instead recompile at that second shape with a symbolic batch size, a graph that then also runs the
      full batches (slower kernels, no CUDA graphs).
    - evaluation runs the plain module (``uncompiled``) in eager mode: eval mode (BatchNorm, dropout) and the
      evaluation batch sizes never reach the compiled graph, so nothing is compiled again at each evaluation.
    - the loss stays outside the compiled graph, so hard and soft (mixup) targets change nothing there.
    """
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        # What torch.use_deterministic_algorithms would have set, had it been called with inductor imported
        # (engine.run.set_deterministic leaves it alone).
        inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
    return torch.compile(model, dynamic=False, backend=backend)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s wrapper (``model`` itself when it is not compiled)."""
    return getattr(model, "_orig_mod", model)
