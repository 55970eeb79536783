"""The resolver that names run folders: conf/hydra/default.yaml joins a folder's parts with
``${path_join:...}``. Whatever composes that config (the training entry point, the reproduction
pipeline, the tests) registers it first with :func:`register_resolvers`."""

from __future__ import annotations

from omegaconf import OmegaConf


def path_join(*parts: object) -> str:
    """The parts joined by ``/``, skipping empty ones (no experiment, no overrides besides the seed)."""
    return "/".join(str(part) for part in parts if part not in (None, ""))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("path_join"):
        OmegaConf.register_new_resolver("path_join", path_join)
