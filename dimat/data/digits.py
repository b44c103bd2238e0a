"""scikit-learn's 8x8 handwritten digits (shipped with scikit-learn; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import DatasetBundle, make_bundle, register_dataset

__all__ = ["load_digits_bundle"]


@register_dataset("digits")
def load_digits_bundle(
    root: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetBundle:
    """Digits as (N, 1, 8, 8): scaled to [0, 1], then standardised with the training mean/std.

    The train/test split is stratified and seeded (`test_fraction`, `seed`).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=float(test_fraction), random_state=int(seed), stratify=y
    )
    # One scalar mean/std: several border pixels are always 0, so per-pixel std would divide by 0.
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return make_bundle("digits", (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, num_classes=10)
