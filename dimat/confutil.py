"""Config nodes as plain Python: Hydra hands us OmegaConf nodes, the library takes dicts."""
from __future__ import annotations

from typing import Any


def plain(node: Any) -> dict[str, Any]:
    """A plain dict copy of a config node (OmegaConf or mapping); ``{}`` for None."""
    if node is None:
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)
