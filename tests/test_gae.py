"""Property tests for gae.py; each test's name states the invariant it checks.

Both implementations are tested on their own, so that a bug shared by the
two cannot hide behind the test that compares them.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd.functional import jacobian
from torch.testing import assert_close

from gae import gae, gae_loop

implementations = pytest.mark.parametrize("gae_fn", [gae, gae_loop], ids=["gae", "gae_loop"])
unit = st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1))  # γ and λ, both ends exact
garbage = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30])


def tensors(shape, elements=None):
    elements = st.floats(-10, 10) if elements is None else elements
    return st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(shape)
    )


@st.composite
def batches(draw, B=None, T=None, holes=False):
    """(rewards, values, mask), [B, T] float64; right-padded unless `holes`.

    Padding holds finite junk, so an implementation that reads it fails."""
    B = B or draw(st.integers(1, 4))
    T = T or draw(st.integers(1, 12))
    if holes:
        mask = draw(tensors((B, T), st.booleans())).bool()
    else:
        # Full rows are where terminal and discount bugs show, so favour them.
        length = st.one_of(st.just(T), st.integers(0, T))
        n_valid = torch.tensor(draw(st.lists(length, min_size=B, max_size=B)))
        mask = torch.arange(T) < n_valid[:, None]
    mask = mask.to(draw(st.sampled_from([torch.bool, torch.float64, torch.int64])))
    return draw(tensors((B, T))), draw(tensors((B, T))), mask


def lengths(mask):
    return mask.bool().sum(1).tolist()


def per_row(fn, mask, *xs):
    """fn applied to each row's valid prefix of xs, zero on padding."""
    out = torch.zeros_like(xs[0])
    for i, n in enumerate(lengths(mask)):
        if n:
            out[i, :n] = fn(*(x[i, :n] for x in xs))
    return out


def after(x):
    """x_{t+1} of one unpadded row; 0 after its last token (terminal)."""
    return torch.cat([x[1:], x.new_zeros(1)])


def discounts(n, c):
    """D[t, s] = c^(s−t) for s ≥ t, else 0 (with 0^0 = 1)."""
    lag = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    return torch.where(lag >= 0, torch.tensor(c, dtype=torch.float64) ** lag.clamp(min=0), 0.0)


@implementations
@given(batches(), unit)
def test_lambda_zero_is_one_step_td_error(gae_fn, batch, gamma):
    """GAE(γ, 0): A_t = δ_t = r_t + γ·V_{t+1} − V_t (eq. 17), V = 0 after the last token."""
    r, v, mask = batch
    adv, _ = gae_fn(r, v, mask, gamma, 0.0)
    assert_close(adv, per_row(lambda r, v: r + gamma * after(v) - v, mask, r, v))


@implementations
@given(batches(), unit)
def test_lambda_one_is_reward_to_go_minus_value(gae_fn, batch, gamma):
    """GAE(γ, 1): A_t = Σ_{s≥t} γ^(s−t)·r_s − V_t (eq. 18): the critic only acts as a baseline."""
    r, v, mask = batch
    adv, _ = gae_fn(r, v, mask, gamma, 1.0)
    assert_close(adv, per_row(lambda r, v: discounts(len(r), gamma) @ r - v, mask, r, v))


@implementations
@given(batches(), unit, unit)
def test_returns_satisfy_lambda_return_recursion(gae_fn, batch, gamma, lam):
    """R_t = r_t + γ·[(1−λ)·V_{t+1} + λ·R_{t+1}], with V and R = 0 after the last token."""
    r, v, mask = batch
    _, ret = gae_fn(r, v, mask, gamma, lam)
    recursion = lambda r, v, R: r + gamma * ((1 - lam) * after(v) + lam * after(R))
    assert_close(ret, per_row(recursion, mask, r, v, ret))


@implementations
@given(batches(), st.data(), unit, unit, st.floats(-3, 3), st.floats(-3, 3))
def test_linear_in_rewards_and_values(gae_fn, batch, data, gamma, lam, a, b):
    """gae(a·r1 + b·r2, a·v1 + b·v2) = a·gae(r1, v1) + b·gae(r2, v2), for advantages and returns."""
    r1, v1, mask = batch
    r2, v2 = data.draw(tensors(r1.shape)), data.draw(tensors(r1.shape))
    outs1, outs2 = gae_fn(r1, v1, mask, gamma, lam), gae_fn(r2, v2, mask, gamma, lam)
    for out, o1, o2 in zip(gae_fn(a * r1 + b * r2, a * v1 + b * v2, mask, gamma, lam), outs1, outs2):
        assert_close(out, a * o1 + b * o2)


@implementations
@given(batches(), unit, unit)
def test_advantage_gradient_wrt_rewards_is_discount(gae_fn, batch, gamma, lam):
    """∂A_t/∂r_s = (γλ)^(s−t) for valid s ≥ t of the same row, else 0: no credit flows
    from the past, from other rows, or from padding."""
    r, v, mask = batch
    jac = jacobian(lambda r: gae_fn(r, v, mask, gamma, lam)[0], r, vectorize=True)
    expected = torch.zeros_like(jac)
    for i, n in enumerate(lengths(mask)):
        expected[i, :n, i, :n] = discounts(n, gamma * lam)
    assert_close(jac, expected)


@implementations
@given(batches(), st.data(), unit, unit)
def test_padding_garbage_never_reaches_the_result(gae_fn, batch, data, gamma, lam):
    """NaN, ±inf or 1e30 in padded rewards and values changes no bit of the output;
    padding outputs exactly 0, and each row equals GAE on that row unpadded."""
    r, v, mask = batch
    pad = ~mask.bool()
    dirty_r, dirty_v = (torch.where(pad, data.draw(tensors(r.shape, garbage)), x) for x in (r, v))
    clean, dirty = gae_fn(r, v, mask, gamma, lam), gae_fn(dirty_r, dirty_v, mask, gamma, lam)
    for k in range(2):
        assert torch.equal(dirty[k], clean[k])
        assert (dirty[k][pad] == 0).all()
        alone = lambda r, v, k=k: gae_fn(r[None], v[None], torch.ones(1, len(r)), gamma, lam)[k][0]
        assert_close(clean[k], per_row(alone, mask, r, v), rtol=1e-12, atol=1e-12)


@implementations
@given(batches(), st.data(), unit, unit)
def test_rows_are_independent(gae_fn, batch, data, gamma, lam):
    """Permuting rows permutes the outputs; replacing one row leaves the others bit-identical."""
    B, T = batch[0].shape
    outs = gae_fn(*batch, gamma, lam)
    perm = torch.tensor(data.draw(st.permutations(range(B))))
    for out, permuted in zip(outs, gae_fn(*(x[perm] for x in batch), gamma, lam)):
        assert torch.equal(out[perm], permuted)
    i, row = data.draw(st.integers(0, B - 1)), data.draw(batches(B=1, T=T))
    changed = [torch.cat([x[:i], new.to(x.dtype), x[i + 1 :]]) for x, new in zip(batch, row)]
    keep = torch.arange(B) != i
    for out, new_out in zip(outs, gae_fn(*changed, gamma, lam)):
        assert torch.equal(out[keep], new_out[keep])


@implementations
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(batches(), unit, unit)
def test_pure_and_dtype_preserving(gae_fn, dtype, batch, gamma, lam):
    """Outputs keep the input dtype and the inputs are left untouched, under no_grad too."""
    r, v, mask = batch[0].to(dtype), batch[1].to(dtype), batch[2]
    before = [x.clone() for x in (r, v, mask)]
    with torch.no_grad():
        outs = gae_fn(r, v, mask, gamma, lam)
    assert [o.dtype for o in outs] == [dtype, dtype]
    assert all(torch.equal(x, y) for x, y in zip((r, v, mask), before))


@given(st.one_of(batches(), batches(holes=True)), unit, unit)
def test_vectorised_gae_equals_loop(batch, gamma, lam):
    """The parallel scan `gae` matches the reference loop for any mask, holes included."""
    for fast, reference in zip(gae(*batch, gamma, lam), gae_loop(*batch, gamma, lam)):
        assert_close(fast, reference, rtol=1e-12, atol=1e-12)
