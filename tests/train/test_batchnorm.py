"""BatchNorm statistics re-estimated after the layers before them changed."""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.train.batchnorm import recalibrate_batchnorm


def test_recalibrate_batchnorm_matches_the_batch_statistics() -> None:
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3)
    model = nn.Sequential(conv, norm).eval()
    with torch.no_grad():
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(9.0)
    x = torch.randn(16, 1, 8, 8)
    loader = [(x[:8], None), (x[8:], None), (x, None)]
    assert recalibrate_batchnorm(model, loader, batches=2) == 2
    with torch.no_grad():
        h = conv(x)
    # the cumulative average of the two half-batch means is the full-batch mean
    torch.testing.assert_close(norm.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert norm.momentum == 0.3 and not model.training
    assert recalibrate_batchnorm(nn.Linear(2, 2), loader) == 0
