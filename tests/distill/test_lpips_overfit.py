"""The E-LatentLPIPS paper's overfitting check, in miniature.

Optimise one latent toward a target with each loss under the same budget (Adam, same lr, same
steps, same start) and measure where it ends up with a loss-independent yardstick (MSE to the
target). A fixed trunk has blind spots and local minima that gradient descent on the input falls
into; the ensemble draws a new augmentation every step, so no single blind spot persists and the
only point that is a minimum under every transform is the target itself.

Random trunk weights at width 1/8 on 4x16x16 latents; the L1 term is off in both losses so that
it cannot pull either one to the target by itself.
"""

from __future__ import annotations

import pytest
import torch

from distill.lpips import ELatentLPIPS, LatentLPIPS

STEPS, LR = 200, 0.05


def optimise(loss_fn, start: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    torch.manual_seed(1)
    x = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=LR)
    history = []
    for _ in range(STEPS):
        loss = loss_fn(x, target)
        history.append(float(loss.detach().min()))
        optimiser.zero_grad()
        loss.sum().backward()
        optimiser.step()
    return x.detach(), history


@pytest.mark.parametrize("seed", [0, 1])
def test_ensemble_reconstructs_the_target_far_better_than_plain_latent_lpips(seed):
    torch.manual_seed(seed)
    plain = LatentLPIPS(4, width=0.125, l1_weight=0.0).eval().requires_grad_(False)
    ensemble = ELatentLPIPS(4, width=0.125, l1_weight=0.0, augment="bg").eval().requires_grad_(False)
    ensemble.load_state_dict(plain.state_dict())  # the same trunk and heads: only the ensemble differs
    g = torch.Generator().manual_seed(100 + seed)
    target, start = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)

    x_plain, h_plain = optimise(plain, start, target)
    x_ens, h_ens = optimise(ensemble, start, target)

    def mse(x: torch.Tensor) -> float:
        return float(((x - target) ** 2).mean())

    assert min(h_plain) >= 0 and min(h_ens) >= 0, "a distance went negative"
    assert h_plain[-1] < h_plain[0], "plain LatentLPIPS did not optimise at all: the comparison would be void"
    assert mse(x_ens) < 0.5 * mse(start)
    assert mse(x_ens) < 0.25 * mse(x_plain), (mse(start), mse(x_plain), mse(x_ens))
    # Judged by the plain metric, the ensemble's solution is also far better than the start. (Not
    # necessarily better than plain's own minimum: with the published anti-aliased resampling, seed
    # 0 gives 0.456 against plain's 0.445, and the old bilinear resampling failed the same way on
    # other draws; the paper's yardstick is the distance to the target, asserted above.)
    with torch.no_grad():
        assert float(plain(x_ens, target)) < 0.5 * float(plain(start, target))
