"""A user's own data loader: scikit-learn's 8x8 digits as 64 numeric features, with the
loader's own train/test split, plugged in with

    data.source: examples.digits_features:load
    data.options: {test_rows: 397}

tensorferry calls ``load(path, options)`` with ``data.path`` and ``data.options`` and
validates what comes back as strictly as its own sources (shapes, dtypes, label range,
every class in every split). Return ``pipeline.user_data.UserData``:

- ``task``: "classification" or "regression";
- ``splits``: "train" (required), "val" and "test" (carved out of train, stratified by
  class, as ``data.val_fraction`` / ``data.test_fraction`` say, when absent), or one "all";
  each an ``(x, y)`` pair: x float [N, F] (tabular) or uint8 [N, C, H, W] (images), y int
  class indices or float targets;
- ``class_names`` (classification) and ``feature_names`` (tabular; default f0, f1, ...).

Copy this file, read your own files instead, and point ``data.source`` at your copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.user_data import UserData


def load(path: str | None, options: dict[str, Any]) -> UserData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32)  # [1797, 64], ink 0..16 per pixel
    y = digits.target.astype(np.int64)
    test_rows = int(options.get("test_rows", 397))
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:test_rows], order[test_rows:]
    # Some border pixels are blank in every training image; tensorferry refuses a constant
    # column (it cannot inform the model), so the loader leaves those out.
    keep = x[train].std(axis=0) > 0
    names = np.array([f"pixel_{r}_{c}" for r in range(8) for c in range(8)])[keep]
    x = x[:, keep]
    return UserData(
        task="classification",
        splits={"train": (x[train], y[train]), "test": (x[test], y[test])},
        class_names=tuple(str(name) for name in digits.target_names),
        feature_names=tuple(names.tolist()),
    )
