"""Every reliance of the package on something torch or Lightning do not document, in one place.

Each function here stands in for a public API that does not exist yet; its docstring says why the package needs it
and what public API would replace it. ``tests/test_compat.py`` checks each against the installed versions (run it in
every supported environment): when one of them breaks, the test says which, and this module is the one to change.
The rest of the package uses public APIs only.

Also here, because they replace the private base classes ``torch.nn.modules.conv._ConvNd`` and
``torch.nn.modules.batchnorm._BatchNorm``: the public classes that stand for them (a test checks that every
convolution and batch norm of ``torch.nn`` is one of them).
"""

from __future__ import annotations

from torch import nn

__all__ = ["BATCH_NORM_TYPES", "CONV_TYPES", "is_compiled", "is_forward_redirected"]

#: The convolutions of ``torch.nn`` (their lazy forms are subclasses), in place of the private ``_ConvNd``.
CONV_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: The batch norms of ``torch.nn`` with running statistics, in place of the private ``_BatchNorm`` (the lazy forms
#: are not subclasses of the others until their first forward).
BATCH_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)


def is_forward_redirected(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` is swapped, for this call, for another of its methods by Lightning's or
    Fabric's forward redirection.

    Why: under strategies that wrap the model (DDP, FSDP, DeepSpeed), Lightning runs ``training_step`` through the
    wrapper by setting an instance attribute ``forward`` on the LightningModule, a function named
    ``wrapped_forward`` (``lightning.pytorch.strategies.strategy._ForwardRedirection``, and
    ``lightning.fabric.wrappers._FabricModule`` for Fabric), which calls the method and then puts the original
    ``forward`` back. The hooks of such a call see a "forward" of the model that is really ``training_step``: it is
    not a forward of the model (the real one runs inside it), and the tracker must not count it as one.

    Replaced by: a public marker of a redirected call in Lightning (none in Lightning 2.x). ``tests/test_compat.py``
    runs Lightning's own redirection and checks this function sees it.
    """
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__name__", "") == "wrapped_forward"


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is, or holds, a forward compiled by ``torch.compile``: the wrapper ``torch.compile(model)``
    returns (an ``OptimizedModule`` holding the model as ``_orig_mod``), a module after ``module.compile()`` (its
    ``_compiled_call_impl``), a LightningModule compiled through Lightning (its ``_compiler_ctx``), or a module
    whose ``forward`` was replaced by a compiled function (``_torchdynamo_orig_callable``).

    Why: a compiled forward runs no Python of the model's modules, so a forward of it cannot be watched for the
    rectifier calls it makes; the tracker says so instead of reporting nothing.

    Replaced by: a public "is this module compiled" query in ``torch.compiler`` (none in torch 2.x: the
    ``OptimizedModule`` class lives in the private ``torch._dynamo.eval_frame``). ``tests/test_compat.py``
    compiles a module each of these ways (without running it: no compiler runs) and checks this function sees it.
    """
    if type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
        return True
    if isinstance(module.__dict__.get("_compiler_ctx"), dict):  # Lightning's record of a compiled LightningModule
        return True
    if module.__dict__.get("_compiled_call_impl") is not None:  # `module.compile()`
        return True
    return hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable")
