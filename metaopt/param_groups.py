"""Named blocks of parameters, as torch param groups.

With ``blocks="param_group"`` MetaOptimize learns one step size per param group (or per
``block`` name shared by several groups). :func:`param_groups_by_prefix` builds those groups
from a model by module-name prefixes; the presets are the blocks of the paper: the six
blocks of ResNet-18 (stem, layer1..4, head) and, for the llama2.c-style transformer, the
embedding, each layer and the head.

Example::

    groups = param_groups_by_prefix(model, "resnet18", no_decay=True)
    optimizer = MetaOptimize(groups, base="sgdm", meta="adam", blocks="param_group")
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

# torchvision's names, which the CIFAR variant of this repo keeps.
RESNET18_BLOCKS: dict[str, tuple[str, ...]] = {
    "stem": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "head": ("fc",),
}


def llama2c_blocks(n_layers: int) -> dict[str, tuple[str, ...]]:
    """Embedding, each transformer layer, and the head (final norm and output) of llama2.c's model."""
    blocks = {"embedding": ("tok_embeddings",)}
    blocks.update({f"layer{i}": (f"layers.{i}",) for i in range(n_layers)})
    blocks["head"] = ("norm", "output")
    return blocks


def preset_blocks(name: str, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The named blocks ``"model"`` (those the model declares as ``model.named_blocks``),
    ``"resnet18"`` or ``"llama2c"`` (which counts ``model.layers``)."""
    if name == "model":
        declared = getattr(model, "named_blocks", None)
        if declared is None:
            raise ValueError(
                f"{type(model).__name__} declares no named_blocks: give the blocks as a preset "
                "('resnet18', 'llama2c') or a dict of name -> module prefixes"
            )
        return dict(declared)
    if name == "resnet18":
        return dict(RESNET18_BLOCKS)
    if name == "llama2c":
        return llama2c_blocks(len(model.layers))
    raise ValueError(
        f"unknown block preset {name!r}: use 'model', 'resnet18', 'llama2c' or a dict of name -> module prefixes"
    )


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def param_groups_by_prefix(
    model: nn.Module,
    blocks: str | Mapping[str, Sequence[str]],
    *,
    no_decay: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """Param groups, one per named block, from module-name prefixes.

    Args:
        model: the model whose trainable parameters are split.
        blocks: ``{block name: [module prefixes]}``, or a preset name (``"resnet18"``,
            ``"llama2c"``). Every trainable parameter must match exactly one prefix.
        no_decay: put the vectors and scalars of each block (biases, norm gains) in a second
            group of the same ``block`` with ``weight_decay=0``, as nanoGPT does.
        **options: hyper-parameters set in every group (e.g. ``alpha0=1e-6``).

    Returns:
        Groups with ``params`` as ``(name, parameter)`` pairs and a ``block`` name.
    """
    if isinstance(blocks, str):
        blocks = preset_blocks(blocks, model)
    assignment: dict[str, list[tuple[str, nn.Parameter]]] = {block: [] for block in blocks}
    unmatched = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owners = [block for block, prefixes in blocks.items() if any(_matches(name, prefix) for prefix in prefixes)]
        if len(owners) > 1:
            raise ValueError(f"parameter {name!r} matches several blocks {owners}; make the prefixes disjoint")
        if not owners:
            unmatched.append(name)
            continue
        assignment[owners[0]].append((name, p))
    if unmatched:
        raise ValueError(
            f"parameters {unmatched} match no block of {dict(blocks)}; add their module prefixes to a block"
        )
    groups = []
    for block, named in assignment.items():
        if not no_decay:
            groups.append({"params": named, "block": block, **options})
            continue
        decayed = [(n, p) for n, p in named if p.dim() >= 2]
        not_decayed = [(n, p) for n, p in named if p.dim() < 2]
        groups.append({"params": decayed, "block": block, **options})
        groups.append({"params": not_decayed, "block": block, **options, "weight_decay": 0.0})
    return [group for group in groups if group["params"]]
