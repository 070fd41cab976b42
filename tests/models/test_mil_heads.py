"""The bag heads (her2exp.models.mil): what attention learns, and that padding and order never
change a bag's score. Pure torch on toy bags, no training CLI."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from her2exp.config import ConfigError
from her2exp.models.mil import build_head, masked_softmax

D = 16


def head_cfg(name: str, **kw):
    base = {"name": name, "hidden": 32, "attention_dim": 16, "dropout": 0.0, "gated": True}
    return OmegaConf.create({**base, **kw})


def toy_bags(n_bags: int, gen: torch.Generator, low: int = 6, high: int = 20):
    """Padded bags of N(0, 1) instances; in a positive bag exactly one instance (at `signal`)
    is shifted along one fixed direction - the only thing that tells the classes apart."""
    sizes = torch.randint(low, high + 1, (n_bags,), generator=gen)
    n = int(sizes.max())
    x = torch.randn(n_bags, n, D, generator=gen)
    mask = torch.arange(n)[None, :] < sizes[:, None]
    labels = (torch.rand(n_bags, generator=gen) < 0.5).long()
    signal = (torch.rand(n_bags, generator=gen) * sizes).long()
    direction = torch.zeros(D)
    direction[:4] = 2.0  # norm 4: the signal instance stands out of 20 N(0, 1) ones
    rows = torch.nonzero(labels).squeeze(1)
    x[rows, signal[rows]] += direction
    x[~mask] = torch.randn(int((~mask).sum()), D, generator=gen) * 100  # padding is junk
    return x, mask, labels, signal


def test_abmil_attends_to_the_one_instance_that_carries_the_signal() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    head = build_head(head_cfg("abmil"), D)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(150):
        x, mask, labels, _ = toy_bags(32, gen)
        logits, _ = head(x, mask)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    x, mask, labels, signal = toy_bags(400, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, attention = head(x, mask)
    positive = labels == 1
    hits = (attention.argmax(dim=1) == signal)[positive].float().mean().item()
    assert hits >= 0.90, f"highest attention on the signal instance in {hits:.1%} of bags"
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.90
    # The weights are a distribution over each bag's real instances, 0 on padding.
    assert torch.allclose(attention.sum(dim=1), torch.ones(len(x)), atol=1e-5)
    assert (attention[~mask] == 0).all()


def _pad(x: torch.Tensor, mask: torch.Tensor, extra: int, gen: torch.Generator):
    junk = torch.randn(x.shape[0], extra, x.shape[2], generator=gen) * 1e3
    junk[0, 0] = float("nan")  # not even a NaN in a padding slot reaches the score
    return torch.cat([x, junk], 1), torch.cat([mask, torch.zeros(x.shape[0], extra, dtype=bool)], 1)


@pytest.mark.parametrize(
    ("name", "gated"), [("abmil", True), ("abmil", False), ("mean_pool", True), ("max_pool", True)]
)
@settings(
    max_examples=10,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(extra=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_a_bags_score_depends_on_neither_padding_nor_order(name, gated, extra, seed) -> None:
    torch.manual_seed(seed)
    head = build_head(head_cfg(name, gated=gated), D).eval()
    gen = torch.Generator().manual_seed(seed)
    x, mask, _, _ = toy_bags(4, gen, low=1, high=12)
    with torch.no_grad():
        logits, attention = head(x, mask)
        padded_logits, padded_attention = head(*_pad(x, mask, extra, gen))
        # Each bag's real instances shuffled among themselves, padding left where it is.
        perm = torch.stack([torch.argsort(torch.rand(x.shape[1], generator=gen)) for _ in x])
        perm = torch.where(mask, perm, torch.arange(x.shape[1]))
        order = torch.argsort(torch.where(mask, perm, perm + x.shape[1]), dim=1)
        shuffled = torch.gather(x, 1, order[..., None].expand_as(x))
        shuffled_logits, shuffled_attention = head(shuffled, torch.gather(mask, 1, order))
    assert torch.isfinite(padded_logits).all()
    assert torch.allclose(padded_logits, logits, atol=1e-5)
    assert torch.allclose(padded_attention[:, : x.shape[1]], attention, atol=1e-6)
    assert (padded_attention[:, x.shape[1] :] == 0).all()
    assert torch.allclose(shuffled_logits, logits, atol=1e-5)
    assert torch.allclose(shuffled_attention, torch.gather(attention, 1, order), atol=1e-6)


def test_mean_pool_is_uniform_and_max_pool_one_hot_on_the_top_instance() -> None:
    torch.manual_seed(0)
    x, mask, _, _ = toy_bags(8, torch.Generator().manual_seed(2), low=2, high=9)
    sizes = mask.sum(dim=1, keepdim=True).float()
    mean = build_head(head_cfg("mean_pool"), D).eval()
    with torch.no_grad():
        logits, attention = mean(x, mask)
        h = mean.project(x)
        pooled = (h * mask[..., None]).sum(1) / sizes
    assert torch.allclose(attention, mask / sizes)
    assert torch.allclose(logits, mean.classifier(pooled), atol=1e-5)

    best = build_head(head_cfg("max_pool"), D).eval()
    with torch.no_grad():
        logits, attention = best(x, mask)
        per_tile = best.classifier(best.project(x))
    log_odds = (per_tile[..., 1] - per_tile[..., 0]).masked_fill(~mask, float("-inf"))
    top = log_odds.argmax(dim=1)
    assert torch.equal(attention, torch.nn.functional.one_hot(top, x.shape[1]).float())
    # The bag's logits are its top instance's own.
    assert torch.allclose(logits, per_tile[torch.arange(len(x)), top], atol=1e-5)


@pytest.mark.parametrize("name", ["abmil", "mean_pool", "max_pool"])
def test_a_bag_of_one_real_instance_among_padding_is_that_instance(name) -> None:
    torch.manual_seed(0)
    head = build_head(head_cfg(name), D).eval()
    x = torch.randn(3, 50, D)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[torch.arange(3), torch.tensor([0, 17, 49])] = True
    with torch.no_grad():
        logits, attention = head(x, mask)
        alone = torch.stack(
            [head(x[i : i + 1, [j]], mask[i : i + 1, [j]])[0][0] for i, j in enumerate([0, 17, 49])]
        )
    assert torch.equal(attention, mask.float())
    assert torch.allclose(logits, alone, atol=1e-5)
    # A bag with no real instance at all: zero weights and finite logits, never NaN.
    empty_logits, empty = head(x[:1], torch.zeros(1, 50, dtype=torch.bool))
    assert (empty == 0).all() and torch.isfinite(empty_logits).all()


def test_masked_softmax_gives_padding_exactly_zero_even_under_extreme_scores() -> None:
    scores = torch.tensor([[1e30, -1e30, 5.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [True, False, True]])
    weights = masked_softmax(scores, mask)
    assert weights[0].tolist() == [0.0, 0.0, 1.0]
    assert weights[1].tolist() == [0.5, 0.0, 0.5]


@pytest.mark.parametrize("name", ["mean_pool", "max_pool", "abmil"])
def test_each_mil_config_builds_its_head_over_the_backbones_embedding(name) -> None:
    from conftest import compose_train

    cfg = compose_train([f"mil={name}"])
    head = build_head(cfg.mil, 1536)
    assert head.kind == name and head.project[0].in_features == 1536
    assert head.project[0].out_features == cfg.mil.hidden
    logits, attention = head(torch.randn(2, 5, 1536), torch.ones(2, 5, dtype=torch.bool))
    assert logits.shape == (2, 2) and attention.shape == (2, 5)


def test_an_unknown_head_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"mil.name='none'.*mean_pool, max_pool, abmil"):
        build_head(head_cfg("none"), D)


@pytest.mark.parametrize("name", ["abmil", "mean_pool", "max_pool"])
def test_under_bf16_autocast_the_weights_stay_float32_and_padding_stays_out(name) -> None:
    torch.manual_seed(0)
    head = build_head(head_cfg(name), D).eval()
    x, mask, _, _ = toy_bags(4, torch.Generator().manual_seed(5), low=2, high=10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, attention = head(x, mask)
    assert attention.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.allclose(attention.sum(dim=1), torch.ones(4), atol=1e-6)
    assert (attention[~mask] == 0).all()
