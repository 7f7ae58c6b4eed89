"""The steps that improve a fit for a fixed set of splats: Adam on every parameter, and the
least-squares colour solve (the render is linear in the colours).

Both run on ``[B, n, 8]`` tensors with fixed step counts and no early exit, so there is no host
sync, and per-image sums are running sums, so an image's result does not depend on its batch.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..splats import SPLAT_CHANNELS
from .config import DIAGONAL_FLOOR, FitConfig
from .parameters import raw_to_splats
from .sampling import total


class Adam:
    """Adam over one ``[B, n, 8]`` tensor with a learning rate per channel. Written out because
    pruning gathers the moment estimates along with the parameters."""

    def __init__(self, param: torch.Tensor, lr: torch.Tensor, betas=(0.9, 0.999), eps=1e-15):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def step(self, param: torch.Tensor, grad: torch.Tensor, scale: float, live: torch.Tensor):
        b1, b2 = self.betas
        self.t += 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = self.lr * (scale / (1 - b1**self.t))
        denom = (self.v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        param.sub_(step_size * self.m / denom * live)

    def gather(self, index: torch.Tensor):
        """Keep the moments of the splats ``index [B, k]`` (in that order)."""
        idx = index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS)
        self.m = self.m.gather(1, idx)
        self.v = self.v.gather(1, idx)

    def reset(self, index: torch.Tensor):
        """Forget the moments of the splats ``index [B, k]`` (they were moved)."""
        rows = index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS)
        self.m.scatter_(1, rows, 0.0)
        self.v.scatter_(1, rows, 0.0)

    def state(self):
        return self.m.clone(), self.v.clone()

    def restore(self, images: torch.Tensor, state):
        """Take ``state`` (of :meth:`state`) back for the images where ``images [B]`` holds."""
        keep = images.view(-1, 1, 1)
        self.m, self.v = (torch.where(keep, old, new) for old, new in zip(state, (self.m, self.v)))


def colour_diagonal(splats: torch.Tensor, height: int, width: int, floor: float) -> torch.Tensor:
    """diag(A^T A) of the colour problem, ``[B, n, 1]``: a Gaussian's squares summed over the
    pixels, ~ pi * l11 * l22 in pixel units, each factor floored at ``floor`` pixels
    (``FitConfig.color_diagonal_floor``; 0: the integral as it is)."""
    if floor == 0:  # the expression of the fits before the floor existed, bit for bit
        area = math.pi * height * width * splats[..., 2] * splats[..., 4]
        return area.clamp_min(1e-6).unsqueeze(-1)
    sigma_x = (width * splats[..., 2]).clamp_min(floor)
    sigma_y = (height * splats[..., 4]).clamp_min(floor)
    return (math.pi * sigma_x * sigma_y).unsqueeze(-1)


def solve_colors(
    splats: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    backend: str = "auto",
    floor: float = DIAGONAL_FLOOR,
) -> torch.Tensor:
    """Colours that minimise the squared error for the splats' geometry, by ``steps`` of
    Jacobi-preconditioned conjugate gradients on the normal equations (the render is linear in
    the colours: one render and one VJP per step). Starts from the splats' own colours; a
    fixed step count and no early exit, so there is no host sync. ``floor``: of the
    preconditioner's splat extents (:func:`colour_diagonal`)."""
    if steps <= 0:
        return splats
    return solve_colors_and_error(splats, targets, steps, backend, floor)[0]


def solve_colors_and_error(
    splats: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    backend: str = "auto",
    floor: float = DIAGONAL_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`solve_colors` (the same bits), and the squared error ``[B]`` of the solved splats'
    render, with no render of its own: each step lowers the error by 2 a p.g - a^2 |A p|^2
    (``steps`` 0: the error of ``splats`` as they are)."""
    _, _, height, width = targets.shape
    geometry = splats[..., :5]
    inv_diag = 1 / colour_diagonal(splats, height, width, floor)

    def normal(colors):  # A^T A colours
        full = torch.cat([geometry, colors], -1)
        return ops.render_vjp(
            full, ops.render(full, height, width, backend), height, width, backend
        )[..., 5:]

    colors = splats[..., 5:]
    full = torch.cat([geometry, colors], -1)
    image_residual = targets - ops.render(full, height, width, backend)
    error = total(image_residual.square().flatten(1))
    if steps <= 0:
        return splats, error
    # A^T (b - A x), [B, n, 3]
    residual = ops.render_vjp(full, image_residual, height, width, backend)[..., 5:]
    z = residual * inv_diag
    p = z
    rz = total(residual * z)  # [B, 3]: one system per image and channel
    for _ in range(steps):
        q = normal(p)
        pq = total(p * q)
        alpha = rz / pq.clamp_min(1e-20)
        drop = 2 * alpha * total(p * residual) - alpha.square() * pq  # [B, 3]
        error = error - total(drop)
        colors = colors + alpha.unsqueeze(1) * p
        residual = residual - alpha.unsqueeze(1) * q
        z = residual * inv_diag
        rz_new = total(residual * z)
        p = z + (rz_new / rz.clamp_min(1e-20)).unsqueeze(1) * p
        rz = rz_new
    return torch.cat([geometry, colors], -1), error


def geometry_blocks(splats: torch.Tensor, height: int, width: int):
    """Per-splat Gauss-Newton blocks ``J_i^T J_i`` of the render with respect to each splat's
    geometry in the optimised parameters (parameters.py): ``(position [B, n, 2, 2],
    shape [B, n, 3, 3])`` for (x, y) and (log l11, l21, log l22).

    Closed form for a Gaussian alone on an unbounded image (no cut-off, no border): with
    z = L^-1 (p - mean), every derivative of exp(-|z|^2 / 2) is the Gaussian times a polynomial
    in z (degree 1 for the position, 2 for the shape), so the sum over pixels is H * W * l11 *
    l22 * |colour|^2 times Gaussian moments; position and shape do not couple (odd moments).
    These are exactly the diagonal blocks of the full J^T J: what overlapping splats add is off
    the diagonal."""
    l11, l21, l22 = splats[..., 2], splats[..., 3], splats[..., 4]
    scale = math.pi * height * width * l11 * l22 * splats[..., 5:].square().sum(-1)
    # Position: d(|z|^2 / 2) / d(x, y) = -(z1 / l11 - z2 l21 / (l11 l22), z2 / l22), and
    # E[z z^T] = I / 2 under exp(-|z|^2) / pi.
    a, b, d = 1 / l11, -l21 / (l11 * l22), 1 / l22
    position = (
        torch.stack([torch.stack([a * a + b * b, b * d], -1), torch.stack([b * d, d * d], -1)], -2)
        * (scale / 2)[..., None, None]
    )
    # Shape: coefficients of (z1^2, z1 z2, z2^2) in the derivatives by log l11, l21, log l22,
    # times the fourth moments E[z1^4] = E[z2^4] = 3/4, E[z1^2 z2^2] = 1/4.
    r = l21 / l22
    zero, one = torch.zeros_like(l11), torch.ones_like(l11)
    coef = torch.stack(
        [
            torch.stack([one, -r, zero], -1),
            torch.stack([zero, d, zero], -1),
            torch.stack([zero, zero, one], -1),
        ],
        -2,
    )
    moments = splats.new_tensor([[0.75, 0.0, 0.25], [0.0, 0.25, 0.0], [0.25, 0.0, 0.75]])
    shape = coef @ moments @ coef.transpose(-1, -2) * scale[..., None, None]
    return position, shape


def _solve2(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a^-1 g`` for symmetric ``[..., 2, 2]`` ``a`` (elementwise: batch-invariant bits)."""
    det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    x = a[..., 1, 1] * g[..., 0] - a[..., 0, 1] * g[..., 1]
    y = a[..., 0, 0] * g[..., 1] - a[..., 1, 0] * g[..., 0]
    return torch.stack([x, y], -1) / det.unsqueeze(-1)


def _solve3(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a^-1 g`` for ``[..., 3, 3]`` ``a`` by Cramer's rule (elementwise, like _solve2)."""

    def det3(m0, m1, m2):  # columns
        return (
            m0[..., 0] * (m1[..., 1] * m2[..., 2] - m2[..., 1] * m1[..., 2])
            - m1[..., 0] * (m0[..., 1] * m2[..., 2] - m2[..., 1] * m0[..., 2])
            + m2[..., 0] * (m0[..., 1] * m1[..., 2] - m1[..., 1] * m0[..., 2])
        )

    c0, c1, c2 = a[..., :, 0], a[..., :, 1], a[..., :, 2]
    det = det3(c0, c1, c2)
    return torch.stack([det3(g, c1, c2), det3(c0, g, c2), det3(c0, c1, g)], -1) / det.unsqueeze(-1)


class GaussNewton:
    """Geometry steps by damped block-Jacobi Gauss-Newton with heavy-ball momentum
    (``FitConfig.geometry_step="gauss_newton"``): each splat's step solves its own blocks of
    :func:`geometry_blocks`, damped Levenberg-Marquardt style (``damping`` times their
    diagonal), is clipped to a trust region (position and l21: half the splat's std-dev; log
    scales: 0.3) and is scaled by ``rate``. Overlaps are ignored (block Jacobi), so ``rate``
    stays well under 1. Acts on the geometry channels only; Adam keeps the colours."""

    def __init__(self, param, rate: float, damping: float, momentum: float, height, width):
        self.rate, self.damping, self.momentum = rate, damping, momentum
        self.height, self.width = height, width
        self.velocity = torch.zeros_like(param[..., :5])

    def step(self, param: torch.Tensor, grad: torch.Tensor, scale: float, live: torch.Tensor):
        """``grad``: the loss gradient in the optimised parameters (the loop's, 2 / pixels times
        J^T r); only its geometry part is used."""
        splats = raw_to_splats(param)
        g = grad[..., :5] * (self.height * self.width * 3 / 2)  # J^T r
        position, shape = geometry_blocks(splats, self.height, self.width)
        delta = torch.cat(
            [_solve2(self._damped(position), g[..., :2]), _solve3(self._damped(shape), g[..., 2:])],
            -1,
        )
        sigma = (splats[..., 2] * splats[..., 4]).sqrt().unsqueeze(-1)
        log_cap = torch.full_like(sigma, 0.3)
        cap = torch.cat([0.5 * sigma, 0.5 * sigma, log_cap, 0.5 * sigma, log_cap], -1)
        delta = torch.maximum(torch.minimum(delta, cap), -cap)
        self.velocity.mul_(self.momentum).add_(delta)
        param[..., :5] -= (self.rate * scale) * self.velocity * live

    def _damped(self, block: torch.Tensor) -> torch.Tensor:
        # Levenberg-Marquardt: the diagonal scaled up; the floor keeps colourless splats finite.
        diag = torch.diagonal(block, dim1=-2, dim2=-1)
        return block + torch.diag_embed(self.damping * diag + 1e-3)

    def gather(self, index: torch.Tensor):
        self.velocity = self.velocity.gather(1, index.unsqueeze(-1).expand(-1, -1, 5))

    def reset(self, index: torch.Tensor):
        """After a relocation: all of the momentum goes, not just the moved splats', as the
        relocation's colour solve changes every splat's landscape (resetting only the moved
        rows measured 0.9 dB worse at N=400)."""
        self.velocity.zero_()

    def state(self):
        return self.velocity.clone()

    def restore(self, images: torch.Tensor, state):
        self.velocity = torch.where(images.view(-1, 1, 1), state, self.velocity)


class ColourCG:
    """Colour steps by nonlinear conjugate gradients on the squared error
    (``FitConfig.color_step="cg"``, a form of variable projection): the render is linear in the
    colours, so along a direction p the exact minimiser for the current geometry is
    ``-g.p / |A p|^2``; the directions are Jacobi-preconditioned (closed-form diagonal D, as in
    :func:`solve_colors`) and conjugated across steps (Fletcher-Reeves) while the geometry moves
    under them. Restarts after pruning and relocation. The L1 colour penalty is left out
    (``l1_color`` is tiny next to the squared error). Takes the colours over from Adam.

    ``|A p|^2`` costs a render of p. It is rendered every ``render_every`` steps (and after a
    restart); in between it is estimated as ``kappa * p^T D p``, with kappa, the ratio of the
    two at the last render, per image and channel: how much the splats' overlaps add to the
    diagonal, which changes slowly from one direction to the next (docs/fitting.md row 43)."""

    def __init__(self, height: int, width: int, backend: str, render_every=1, floor=DIAGONAL_FLOOR):
        self.height, self.width, self.backend = height, width, backend
        self.render_every, self.floor = render_every, floor
        self.direction = self.gy = self.kappa = None
        self.count = 0  # steps since the last restart

    def step(self, param: torch.Tensor, splats: torch.Tensor, vjp: torch.Tensor, live, height=None):
        """``splats``: the rendered splats of this step; ``vjp``: the render's VJP of their
        residual (render - target), ``[B, n, 8]``; ``height``: the rows of that render (a row
        view's, views.py; default the image's); updates ``param``'s colours in place."""
        height = self.height if height is None else height
        g = vjp[..., 5:] * live  # gradient of half the squared error
        area = colour_diagonal(splats, height, self.width, self.floor)  # D: diag(A^T A)
        y = g / area
        gy = total(g * y)  # [B, 3]: one problem per image and channel
        if self.direction is None:
            self.direction = -y
        else:
            self.direction = -y + (gy / self.gy.clamp_min(1e-20)).unsqueeze(1) * self.direction
        self.gy = gy
        p = self.direction * live
        diagonal = total(p.square() * area)  # p^T D p
        if self.count % self.render_every == 0:
            ap = ops.render(torch.cat([splats[..., :5], p], -1), height, self.width, self.backend)
            curvature = total(ap.flatten(2).square(), 2)
            self.kappa = curvature / diagonal.clamp_min(1e-30)
        else:
            curvature = self.kappa * diagonal
        self.count += 1
        slope = total(g * p)
        alpha = -slope / curvature.clamp_min(1e-20)
        descent = (slope < 0).unsqueeze(1)  # else no step for that image and channel
        param[..., 5:] += torch.where(descent, alpha.unsqueeze(1) * p, torch.zeros_like(p))

    def gather(self, index: torch.Tensor):
        self.direction = self.gy = self.kappa = None
        self.count = 0

    def reset(self, index: torch.Tensor):
        self.gather(index)

    def state(self):
        return None

    def restore(self, images: torch.Tensor, state):
        pass  # the relocation restarted CG for every image; a kept image loses nothing by it


class Steps:
    """The optimisers of one fit, stepped together and kept aligned with the splats when
    pruning or relocation changes them (``gather`` / ``reset``): Adam, optionally Gauss-Newton
    on the geometry (Adam's geometry rates are then zero) and :class:`ColourCG` on the colours
    from step ``colour_start`` on (Adam's colour rates are zeroed then)."""

    def __init__(self, adam: Adam, geometry=None, colours=None, colour_start: int = 0):
        self.adam, self.geometry, self.colours = adam, geometry, colours
        self.colour_start, self.count = colour_start, 0
        self.followers = [o for o in (adam, geometry, colours) if o is not None]

    def step(self, param, grad, scale: float, live, splats, vjp, height=None):
        """``grad``: the loss gradient in ``param``'s coordinates; ``splats``, ``vjp`` and
        ``height``: this step's rendered splats, the render's VJP of its residual and its rows."""
        if self.colours is not None and self.count >= self.colour_start:
            if self.count == self.colour_start:
                self.adam.lr[5:] = 0  # in place, on the device: no sync
            self.colours.step(param, splats, vjp, live, height)
        self.adam.step(param, grad, scale, live)
        if self.geometry is not None:
            self.geometry.step(param, grad, scale, live)
        self.count += 1

    def gather(self, index: torch.Tensor):
        for optimiser in self.followers:
            optimiser.gather(index)

    def reset(self, index: torch.Tensor):
        for optimiser in self.followers:
            optimiser.reset(index)

    def state(self):
        """What :meth:`restore` takes back (before a relocation that may be undone)."""
        return [optimiser.state() for optimiser in self.followers]

    def restore(self, images: torch.Tensor, state):
        for optimiser, kept in zip(self.followers, state):
            optimiser.restore(images, kept)


def make_steps(cfg: FitConfig, raw: torch.Tensor, lr: torch.Tensor, size, backend: str) -> Steps:
    """The optimisers ``cfg`` asks for over ``raw [B, n, 8]`` for images of ``size (H, W)``:
    Adam with the per-channel rates ``lr`` on every parameter that Gauss-Newton
    (``geometry_step``) or colour CG (``color_step``, for ``color_cg_min_splats`` or more, from
    ``color_cg_start`` or, with fewer than ``color_cg_dense_pixels`` pixels per splat,
    ``color_cg_start_dense``) does not take (``lr`` is zeroed there)."""
    height, width = size
    geometry = colours = None
    if cfg.geometry_step == "gauss_newton":
        lr[:5] = 0
        geometry = GaussNewton(raw, cfg.gn_rate, cfg.gn_damping, cfg.gn_momentum, height, width)
    if cfg.color_step == "cg" and cfg.num_splats >= cfg.color_cg_min_splats:
        colours = ColourCG(
            height, width, backend, cfg.color_cg_render_every, cfg.color_diagonal_floor
        )
    dense = height * width < cfg.color_cg_dense_pixels * cfg.num_splats
    start = int((cfg.color_cg_start_dense if dense else cfg.color_cg_start) * cfg.iterations)
    return Steps(Adam(raw, lr, betas=(0.9, cfg.adam_beta2)), geometry, colours, start)
