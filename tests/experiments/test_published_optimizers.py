"""MetaOptimize at meta_lr = 0 against published optimizers that torch lacks (timm's Lion); the torch ones are
compared in tests/metaopt/test_optimizer.py."""

from __future__ import annotations

import pytest
import timm.optim

from metaopt import METAS
from tests.metaopt.references import assert_meta_lr_zero_is


def timm_lion(params, alpha0, weight_decay):
    return timm.optim.Lion(params, lr=alpha0, betas=(0.9, 0.99), weight_decay=weight_decay)


@pytest.mark.parametrize("meta", list(METAS))
@pytest.mark.parametrize("base", ["lion"])
def test_meta_lr_zero_is_the_published_base_optimizer(base, meta):
    assert_meta_lr_zero_is(base, meta, timm_lion)
