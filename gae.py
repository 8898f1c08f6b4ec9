"""Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

Each response is one episode: token t is an action with reward r_t, and
V_t = V(s_t) is the critic's value before it. GAE is the (γλ)-discounted sum
of TD errors (eq. 16), which runs backwards as a recursion:

    δ_t = r_t + γ·V_{t+1} − V_t
    A_t = Σ_{l≥0} (γλ)^l·δ_{t+l} = δ_t + γλ·A_{t+1}
    R_t = A_t + V_t            (the λ-return, the critic's target)

`gae_loop` is that recursion written out, the reference; `gae`, which the
training scripts use, computes the same sums in log2(T) whole-batch steps
instead of T small ones, which matters for long responses (docs/actor_critic.md
has the timing).

Needs only torch.
MIT licence (the text is in LICENSE), Copyright (c) 2026 the authors of this repository: copy it, with this notice.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def gae_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Reference GAE, one time step at a time; same contract as `gae`."""
    mask = mask.bool()
    zero = rewards.new_zeros(rewards.shape[0])
    next_value, next_adv = zero, zero  # past the last column every response has ended
    advantages = [zero] * rewards.shape[1]
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # δ_t = r_t + γ·V_{t+1} − V_t
        adv = delta + gamma * lam * next_adv  # A_t = δ_t + γλ·A_{t+1}
        # Select rather than multiply by the mask: padding may hold NaN, and NaN·0 = NaN.
        advantages[t] = next_adv = torch.where(mask[:, t], adv, zero)
        # A padded step hands V = 0 and A = 0 back to its predecessor,
        # which makes a response's last valid token terminal.
        next_value = torch.where(mask[:, t], values[:, t], zero)
    advantages = torch.stack(advantages, dim=1)
    return advantages, torch.where(mask, advantages + values, 0.0)  # R_t = A_t + V_t


def _shift(x: Tensor, k: int) -> Tensor:
    """x_{t+k} along dim 1, zero (False) past the end."""
    return F.pad(x[:, k:], (0, k))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns, [B, T] each, for right-padded responses.

    rewards, values, mask: [B, T]; mask (bool or 0/1) is set on every response
    token up to and including EOS. With

        δ_t = r_t + γ·V_{t+1} − V_t,    A_t = δ_t + γλ·A_{t+1},    R_t = A_t + V_t,

    the step after a response's last valid token is terminal: there
    V_{t+1} = 0 and A_{t+1} = 0. Padded positions return exactly 0, and
    nothing stored there, not even NaN or inf, reaches a valid position.
    A mask with gaps is read position by position: each gap ends a response.

    Computed as a parallel scan: the recursion is A_t = δ_t + c_t·A_{t+1} with
    c_t = γλ inside a response and 0 at its last token, so summing pairs of
    ever longer blocks covers T steps in log2(T) passes. Equal to `gae_loop`
    up to rounding.
    """
    mask = mask.bool()
    # torch.where, never a multiplication by the mask: padding may hold NaN, and NaN·0 = NaN.
    next_value = torch.where(_shift(mask, 1), _shift(values, 1), 0.0)  # V_{t+1}, 0 once the response has ended
    adv = torch.where(mask, rewards + gamma * next_value - values, 0.0)  # δ_t = r_t + γ·V_{t+1} − V_t
    coef = (mask & _shift(mask, 1)).to(rewards.dtype) * (gamma * lam)  # c_t
    k = 1
    while k < rewards.shape[1]:
        # Invariant after this pass: adv_t = Σ_{l<2k} c_t⋯c_{t+l−1}·δ_{t+l} and coef_t = c_t⋯c_{t+2k−1}.
        # Both are 0 on padding by now, so multiplying them is safe.
        adv = adv + coef * _shift(adv, k)
        coef = coef * _shift(coef, k)
        k *= 2
    return adv, torch.where(mask, adv + values, 0.0)  # R_t = A_t + V_t
