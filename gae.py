"""Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

Each response is one episode: token t is an action with reward r_t, and
V_t = V(s_t) is the critic's estimate before it. From the TD error

    δ_t = r_t + γ·V_{t+1} − V_t

GAE is the (γλ)-discounted sum of future TD errors (eq. 16), which is
computed backwards as a recursion:

    A_t = Σ_{l≥0} (γλ)^l · δ_{t+l} = δ_t + γλ·A_{t+1}

The critic's target is the λ-return R_t = A_t + V_t.

Inputs are [B, T] and right-padded; `mask` (bool or 0/1) is set on every
response token up to and including EOS. The step after a response's last
valid token is terminal: there V_{t+1} = 0 and A_{t+1} = 0. Padded positions
output exactly 0, and nothing stored there, not even NaN or inf, can reach a
valid position: we select with torch.where because NaN·0 = NaN.

`gae_loop` is the readable reference; `gae` computes the same sums with
O(log T) whole-batch operations instead of T small ones, which is what makes
it faster on CPU (about 4x at [256, 512], 6x at [256, 16]) and far faster on GPU.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def gae_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Reference GAE: the backward recursion, one time step at a time.

    rewards, values, mask: [B, T]. Returns (advantages, returns), each [B, T],
    zero on padding.
    """
    mask = mask.bool()
    zero = rewards.new_zeros(rewards.shape[0])
    # Past the end of the batch every response has ended: V_T = A_T = 0.
    next_value, next_adv = zero, zero
    advantages = [zero] * rewards.shape[1]
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # δ_t = r_t + γ·V_{t+1} − V_t
        adv = delta + gamma * lam * next_adv  # A_t = δ_t + γλ·A_{t+1}
        advantages[t] = next_adv = torch.where(valid, adv, zero)
        # A padded step hands V = 0 (and A = 0) to the step before it, which
        # makes a response's last valid token terminal.
        next_value = torch.where(valid, values[:, t], zero)
    advantages = torch.stack(advantages, dim=1)
    return advantages, torch.where(mask, advantages + values, 0.0)  # R_t = A_t + V_t


def _shift(x: Tensor, k: int) -> Tensor:
    """x_{t+k} along dim 1, zero (or False) past the end."""
    return F.pad(x[:, k:], (0, k))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE as a parallel scan; equal to `gae_loop` up to rounding.

    rewards, values, mask: [B, T]. Returns (advantages, returns), each [B, T],
    zero on padding.

    The recursion A_t = δ_t + c_t·A_{t+1} is linear, with c_t = γλ while the
    response continues and 0 at its last valid token. After the step with
    shift k, A_t sums the δ of the next 2k positions and c_t is the product of
    the next 2k coefficients, so log2(T) steps cover the whole sequence.
    """
    mask = mask.bool()
    next_value = torch.where(_shift(mask, 1), _shift(values, 1), 0.0)  # V_{t+1}, 0 once the response has ended
    adv = torch.where(mask, rewards + gamma * next_value - values, 0.0)  # δ_t = r_t + γ·V_{t+1} − V_t
    coef = (mask & _shift(mask, 1)).to(rewards.dtype) * (gamma * lam)
    k = 1
    while k < rewards.shape[1]:
        # Both operands are already clean (0 on padding), so multiplying is safe.
        adv = adv + coef * _shift(adv, k)
        coef = coef * _shift(coef, k)
        k *= 2
    return adv, torch.where(mask, adv + values, 0.0)  # R_t = A_t + V_t
