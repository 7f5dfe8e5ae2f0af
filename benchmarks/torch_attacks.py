"""PyTorch eager references of the attacks, in the style of torchattacks / advertorch.

Each function runs the same algorithm, with the same hyper-parameters, as its JAX counterpart in
`unmask_jax.attacks`, written the way a PyTorch user would: a Python loop of eager forward and
`torch.autograd.grad` calls on the whole batch. Differences from those libraries, all chosen so that
both sides compute the same thing:
  * the random start (PGD, APGD) is passed in (`x0`), drawn by the JAX side, so both start alike;
  * losses are summed over the batch (torchattacks takes the mean): the per-example gradients are
    then exactly the JAX ones, and sign / L2-normalised steps are unchanged by the scale;
  * MI-FGSM normalises each gradient by its L1 norm (torchattacks: by its mean absolute value,
    which is the same direction up to a constant factor);
  * CW-L2 keeps one constant c per example with a binary search, as Carlini's code and advertorch
    (torchattacks uses one c for the batch and no search);
  * DeepFool is batched over examples with one backward pass per candidate class (torchattacks
    loops over single images), and, like every eager implementation, stops as soon as every
    example is misclassified.

All take and return NCHW float32 tensors in [0, 1]; `model` is in eval mode with frozen weights.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from unmask_jax.attacks import apgd as jax_apgd

TINY = 1e-12


def _bcast(v: torch.Tensor) -> torch.Tensor:
  return v.view(-1, 1, 1, 1)


def _l2(v: torch.Tensor) -> torch.Tensor:
  return v.flatten(1).norm(dim=1)


def _normalize_l2(v: torch.Tensor) -> torch.Tensor:
  return v / _bcast(_l2(v).clamp_min(TINY))


def _project(norm: str, x_adv, x, eps):
  if norm == 'linf':
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
  delta = x_adv - x
  scale = (eps / _l2(delta).clamp_min(TINY)).clamp(max=1.0)
  return (x + delta * _bcast(scale)).clamp(0.0, 1.0)


def _steepest(norm: str, g):
  return g.sign() if norm == 'linf' else _normalize_l2(g)


def _ce_grad(model, x_adv, y):
  """(per-example CE [N], its input gradient, logits), one forward and one backward pass."""
  x_adv = x_adv.detach().requires_grad_(True)
  logits = model(x_adv)
  per_ex = F.cross_entropy(logits, y, reduction='none')
  (g,) = torch.autograd.grad(per_ex.sum(), x_adv)
  return per_ex.detach(), g, logits.detach()


def pgd(model, x, y, x0, *, norm: str, eps: float, step_size: float, steps: int):
  """PGD (Madry et al.): x_{t+1} = P(x_t + alpha * s(grad)), from x0 (torchattacks.PGD/PGDL2)."""
  x_adv = x0.clone()
  for _ in range(steps):
    _, g, _ = _ce_grad(model, x_adv, y)
    x_adv = _project(norm, x_adv + step_size * _steepest(norm, g), x, eps)
  return x_adv


def mifgsm(model, x, y, *, norm: str, eps: float, step_size: float, steps: int,
           decay: float = 1.0):
  """MI-FGSM (Dong et al.): g = mu g + grad / ||grad||_1; x = P(x + alpha s(g)) (torchattacks)."""
  x_adv = x.clone()
  mom = torch.zeros_like(x)
  for _ in range(steps):
    _, g, _ = _ce_grad(model, x_adv, y)
    mom = decay * mom + g / _bcast(g.abs().flatten(1).sum(1).clamp_min(TINY))
    x_adv = _project(norm, x_adv + step_size * _steepest(norm, mom), x, eps)
  return x_adv


def _margin(logits, y):
  """max_{i != y} Z_i - Z_y per example."""
  z_y = logits.gather(1, y[:, None])[:, 0]
  other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf)
  return other.max(1).values - z_y


def cw_l2(model, x, y, *, steps: int, binary_search_steps: int, initial_const: float = 1e-3,
          lr: float = 1e-2, kappa: float = 0.0):
  """Carlini-Wagner L2 with a per-example binary search over c (advertorch's CarliniWagnerL2)."""
  n = x.shape[0]
  w0 = torch.atanh((2 * x - 1) * (1 - 1e-6))
  c = torch.full((n,), initial_const)
  lower = torch.zeros(n)
  upper = torch.full((n,), 1e10)
  best_dist = torch.full((n,), math.inf)
  best_x = x.clone()
  for _ in range(binary_search_steps):
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    found = torch.zeros(n, dtype=torch.bool)
    for _ in range(steps):
      x_adv = (torch.tanh(w) + 1) / 2
      logits = model(x_adv)
      dist = (x_adv - x).square().flatten(1).sum(1)
      m = _margin(logits, y)
      loss = (dist + c * torch.clamp(-m, min=-kappa)).sum()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      with torch.no_grad():
        succ = m > kappa
        improved = succ & (dist < best_dist)
        best_dist = torch.where(improved, dist, best_dist)
        best_x = torch.where(_bcast(improved), x_adv, best_x)
        found |= succ
      opt.step()
    new_upper = torch.where(found, torch.minimum(upper, c), upper)
    new_lower = torch.where(found, lower, torch.maximum(lower, c))
    c = torch.where(new_upper < 1e9, (new_lower + new_upper) / 2, c * 10)
    upper, lower = new_upper, new_lower
  return best_x.detach()


def deepfool(model, x, y, *, steps: int = 50, overshoot: float = 0.02, candidates: int = 10,
             info: dict | None = None):
  """Batched DeepFool L2; candidate classes = y + the top clean competitors; early exit.

  `info`, if given, receives 'iterations': the gradient iterations run before every example was
  misclassified (or `steps`).
  """
  with torch.no_grad():
    logits0 = model(x)
  k = logits0.shape[1]
  nc = min(candidates, k)
  others = logits0.masked_fill(F.one_hot(y, k).bool(), -math.inf)
  cls = torch.cat([y[:, None], others.topk(nc - 1, dim=1).indices], dim=1)  # [N, nc]
  r_tot = torch.zeros_like(x)
  active = torch.ones(x.shape[0], dtype=torch.bool)
  iterations = 0
  for _ in range(steps):
    x_i = (x + (1 + overshoot) * r_tot).clamp(0, 1).requires_grad_(True)
    logits = model(x_i)
    active = active & (logits.argmax(1) == y)
    if not active.any():
      break
    iterations += 1
    z = logits.gather(1, cls)  # [N, nc]
    grads = [torch.autograd.grad(z[:, j].sum(), x_i, retain_graph=j < nc - 1)[0]
             for j in range(nc)]
    with torch.no_grad():
      f = z[:, 1:] - z[:, :1]
      w = torch.stack([g - grads[0] for g in grads[1:]])  # [nc-1, N, C, H, W]
      w_norm = w.flatten(2).norm(dim=2)  # [nc-1, N]
      dist = f.T.abs() / w_norm.clamp_min(TINY)
      best = dist.argmin(0)
      ar = torch.arange(x.shape[0])
      w_l = w[best, ar]
      d_l = dist[best, ar]
      r_i = _bcast(d_l + 1e-4) * _normalize_l2(w_l)
      r_tot = r_tot + torch.where(_bcast(active), r_i, torch.zeros_like(r_i))
  if info is not None:
    info['iterations'] = iterations
  return (x + (1 + overshoot) * r_tot).clamp(0, 1).detach()


def apgd_schedule(steps: int) -> dict[int, int]:
  """{checkpoint iteration: its window length} of APGD, from the library's schedule."""
  is_check, window = jax_apgd.checkpoint_schedule(steps)
  return {int(i): int(window[i]) for i in np.flatnonzero(is_check)}


def apgd(model, x, y, x0, *, norm: str, eps: float, steps: int, rho: float = 0.75,
         momentum: float = 0.75):
  """APGD-CE (Croce & Hein), the same iteration as autoattack's APGDAttack, from x0."""
  sched = apgd_schedule(steps)
  n = x.shape[0]
  loss, grad, logits = _ce_grad(model, x0, y)
  xk, x_old = x0.clone(), x0.clone()
  eta = torch.full((n,), 2.0 * eps)
  loss_prev = loss
  n_incr = torch.zeros(n)
  x_best, grad_best, loss_best = x0.clone(), grad, loss
  x_adv, success = x0.clone(), logits.argmax(1) != y
  reduced_last = torch.ones(n, dtype=torch.bool)
  loss_best_last = loss
  for i in range(steps):
    a = 1.0 if i == 0 else momentum
    z = _project(norm, xk + _bcast(eta) * _steepest(norm, grad), x, eps)
    x_new = _project(norm, xk + a * (z - xk) + (1 - a) * (xk - x_old), x, eps)
    loss_new, grad_new, logits = _ce_grad(model, x_new, y)
    succ = logits.argmax(1) != y
    x_adv = torch.where(_bcast(succ), x_new, x_adv)
    success |= succ
    n_incr = n_incr + (loss_new > loss_prev).float()
    improved = loss_new > loss_best
    x_best = torch.where(_bcast(improved), x_new, x_best)
    grad_best = torch.where(_bcast(improved), grad_new, grad_best)
    loss_best = torch.where(improved, loss_new, loss_best)
    x_old, xk, grad, loss_prev = xk, x_new, grad_new, loss_new
    if i in sched:
      oscillating = n_incr <= sched[i] * rho
      stalled = ~reduced_last & (loss_best_last >= loss_best)
      reduce = oscillating | stalled
      xk = torch.where(_bcast(reduce), x_best, xk)
      grad = torch.where(_bcast(reduce), grad_best, grad)
      eta = torch.where(reduce, eta / 2, eta)
      n_incr = torch.zeros(n)
      reduced_last = reduce
      loss_best_last = loss_best
  return torch.where(_bcast(success), x_adv, x_best)
