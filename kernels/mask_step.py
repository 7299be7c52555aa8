"""Triton kernel of the fused Cognitive Distillation mask step (oracle: ``trojanguard.ops.mask_step_reference``).

One step, per sample i and mask channel j: mask gradient (channel reduction of ``g·(x − δ)``, L1, TV stencil,
tanh chain rule), Adam on θ in place, δ for the next step from the counter-based RNG, and the next ``x_adv``.

Design. Each (i, j) mask plane of H·W pixels is cut into flat tiles of ``BLOCK`` pixels (row-major, so a tile
may start and end mid-row); one program owns one tile of one plane and all the channels that feed it (all C
for M = 1, channel j for M = C) and reads θ, the Adam moments, x and g once and writes θ, the moments and
``x_adv`` once. Grid: ``(N·M·tiles,)``.

The TV stencil needs the *pre-step* θ of the four neighbours while θ is updated in place, which is a race in
two places:

* across programs: a tile's up/down (and first/last left/right) neighbours lie within W pixels before or after
  it, in tiles other programs may already have updated. When a plane needs more than one tile, a small first
  kernel ``_mask_step_halo_kernel`` copies, for every tile, the W pixels of θ just before and just after it
  into a scratch buffer (N·M·tiles·2·W floats, written once and read once: 12·2W/BLOCK extra bytes per
  pixel, ≈ 9 % of an fp32 C = 3 step at 224×224, 2.5 % at 64×64) and the main kernel reads out-of-tile
  neighbours from there. Planes that fit one tile (up to 1024 pixels for M = 1, C = 3, e.g. 32×32; 2048 for
  M = C or C = 1) skip it: one launch.
* within a program: threads read neighbour θ that other warps of the same program write. All neighbour loads
  happen before a ``tl.debug_barrier()`` (a CTA barrier on GPU, a no-op in the interpreter, which runs a
  program's loads before its stores anyway) and every store after it.

Precision: all math in fp32; ``m = (tanh θ + 1)/2`` is computed as ``sigmoid(2θ)`` (same function, no
cancellation near m = 0, available in every Triton version); on GPU ``exp`` and ``/`` are Triton's fast
approximations (≤ 2 ulp), far inside the fp32 tolerance of the tests. δ is bit-identical to the reference: the
lowbias32 hash runs in uint32 (multiplication wraps mod 2³²) and ``(h >> 8)·2⁻²⁴`` is exact in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from trojanguard.ops.mask_step import MaskStepParams

TILE_ELEMENTS = 4096  # pixels × channels of one program's x and g tiles (held in registers)
MIN_BLOCK = 128  # smallest tile in pixels, however many channels
MAX_BLOCK = 2048  # largest tile in pixels: the 1-D state tensors (θ, neighbours, moments) fill registers too
ELEMENTS_PER_WARP = 256  # tile elements per warp: sets num_warps (4 to 8); ~80-95 registers on sm_90
MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------- kernels
@triton.jit
def _lowbias32(a):
    """Wellons' lowbias32 hash on uint32 (products wrap mod 2³², shifts are logical)."""
    a = a ^ (a >> 16)
    a = a * 0x7FEB352D
    a = a ^ (a >> 15)
    a = a * 0x846CA68B
    return a ^ (a >> 16)


@triton.jit
def _mask(theta):
    """m = (tanh θ + 1)/2 = sigmoid(2θ), fp32."""
    return 1.0 / (1.0 + tl.exp(-2.0 * theta))


@triton.jit
def _old_neighbour_mask(theta_plane_ptr, halo_ptr, q, needed, tile_start, W,
                        BLOCK: tl.constexpr, HAS_HALO: tl.constexpr):
    """Pre-step m at flat plane index q (|q − tile| ≤ W): own tile from θ, other tiles from the halo copy."""
    if HAS_HALO:
        in_tile = (q >= tile_start) & (q < tile_start + BLOCK)
        own = tl.load(theta_plane_ptr + q, mask=needed & in_tile, other=0.0)
        halo_index = tl.where(q < tile_start, q - tile_start + W, q - tile_start - BLOCK + W)
        other = tl.load(halo_ptr + halo_index, mask=needed & (~in_tile), other=0.0)
        theta = tl.where(in_tile, own, other)
    else:
        theta = tl.load(theta_plane_ptr + q, mask=needed, other=0.0)
    return _mask(theta)


@triton.jit
def _mask_step_halo_kernel(theta_ptr, halo_ptr, HW, W, TILES, BLOCK: tl.constexpr, BLOCK_W: tl.constexpr):
    """halo[plane, tile] = (θ[tile_start − W : tile_start], θ[tile_end : tile_end + W]) before the step."""
    pid = tl.program_id(0)
    plane = pid // TILES
    tile_start = (pid - plane * TILES) * BLOCK
    theta_plane_ptr = theta_ptr + plane.to(tl.int64) * HW
    halo_tile_ptr = halo_ptr + pid.to(tl.int64) * 2 * W
    for k0 in range(0, W, BLOCK_W):
        k = k0 + tl.arange(0, BLOCK_W)
        ok = k < W
        before = tile_start - W + k
        after = tile_start + BLOCK + k
        tl.store(halo_tile_ptr + k, tl.load(theta_plane_ptr + before, mask=ok & (before >= 0), other=0.0), mask=ok)
        tl.store(halo_tile_ptr + W + k, tl.load(theta_plane_ptr + after, mask=ok & (after < HW), other=0.0),
                 mask=ok)


@triton.jit
def _mask_step_fwd_kernel(
    theta_ptr, exp_avg_ptr, exp_avg_sq_ptr, x_ptr, delta_ptr, grad_ptr, seeds_ptr, mean_ptr, std_ptr,
    halo_ptr, delta_next_ptr, out_ptr,
    C, M, H, W, HW, TILES, CHANNELS,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
    l1_weight, tv_weight, tv_norm, next_step,
    HAS_NORM: tl.constexpr, HAS_HALO: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One tile of one (i, j) plane: gradient, Adam, next δ and x_adv. CHANNELS = C if M = 1 else 1."""
    pid = tl.program_id(0)
    plane = pid // TILES
    tile = pid - plane * TILES
    sample = plane // M
    first_channel = plane - sample * M  # j; 0 when M = 1

    tile_start = tile * BLOCK
    offs = tile_start + tl.arange(0, BLOCK)
    valid = offs < HW
    row = offs // W
    col = offs - row * W
    plane_offset = plane.to(tl.int64) * HW
    theta_plane_ptr = theta_ptr + plane_offset
    halo_tile_ptr = halo_ptr + pid.to(tl.int64) * 2 * W

    channel_index = tl.arange(0, BLOCK_C)
    channel_ok = channel_index < CHANNELS
    channels = first_channel + channel_index
    image_offset = (sample * C + channels).to(tl.int64) * HW  # (BLOCK_C,)
    tile_mask = channel_ok[:, None] & valid[None, :]

    # ---- loads (pre-step state, neighbours included) ----
    theta = tl.load(theta_plane_ptr + offs, mask=valid, other=0.0)
    exp_avg = tl.load(exp_avg_ptr + plane_offset + offs, mask=valid, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + plane_offset + offs, mask=valid, other=0.0)
    x = tl.load(x_ptr + image_offset[:, None] + offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + image_offset[:, None] + offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + sample * C + channels, mask=channel_ok, other=0.0)
    has_up = valid & (row > 0)
    has_down = valid & (row < H - 1)
    has_left = valid & (col > 0)
    has_right = valid & (col < W - 1)
    m_up = _old_neighbour_mask(theta_plane_ptr, halo_tile_ptr, offs - W, has_up, tile_start, W, BLOCK, HAS_HALO)
    m_down = _old_neighbour_mask(theta_plane_ptr, halo_tile_ptr, offs + W, has_down, tile_start, W, BLOCK,
                                 HAS_HALO)
    m_left = _old_neighbour_mask(theta_plane_ptr, halo_tile_ptr, offs - 1, has_left, tile_start, W, BLOCK,
                                 HAS_HALO)
    m_right = _old_neighbour_mask(theta_plane_ptr, halo_tile_ptr, offs + 1, has_right, tile_start, W, BLOCK,
                                  HAS_HALO)
    if HAS_NORM:
        mean = tl.load(mean_ptr + channels, mask=channel_ok, other=0.0)
        std = tl.load(std_ptr + channels, mask=channel_ok, other=1.0)
        g = g / std[:, None]

    # ---- mask gradient: data + γ + β·∂TV/∂m, times dm/dθ ----
    m = _mask(theta)
    data = tl.sum(g * (x - delta[:, None]), axis=0)
    stencil = tl.where(has_up, m - m_up, 0.0) + tl.where(has_down, m - m_down, 0.0)
    stencil += tl.where(has_left, m - m_left, 0.0) + tl.where(has_right, m - m_right, 0.0)
    grad = (data + l1_weight + tv_weight * (stencil * tv_norm)) * 2.0 * m * (1.0 - m)

    # ---- Adam (torch.optim.Adam, bias corrections folded into step_size and bias_correction2_sqrt) ----
    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    denom = tl.sqrt_rn(exp_avg_sq) / bias_correction2_sqrt + eps
    theta = theta - step_size * (exp_avg / denom)

    # ---- next δ: h = hash(hash(hash(seed) + step) + c), u = (h >> 8)·2⁻²⁴ ----
    seed = tl.load(seeds_ptr + sample + tl.zeros([BLOCK_C], dtype=tl.int32)).to(tl.uint32)
    step = (tl.zeros([BLOCK_C], dtype=tl.int32) + next_step).to(tl.uint32)  # int32 bits of the uint32 count
    h = _lowbias32(_lowbias32(seed) + step)
    h = _lowbias32(h + channels.to(tl.uint32))
    delta_next = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)

    # every thread of this program has read its neighbours' old θ before anyone overwrites it
    tl.debug_barrier()
    tl.store(theta_plane_ptr + offs, theta, mask=valid)
    tl.store(exp_avg_ptr + plane_offset + offs, exp_avg, mask=valid)
    tl.store(exp_avg_sq_ptr + plane_offset + offs, exp_avg_sq, mask=valid)
    tl.store(delta_next_ptr + sample * C + channels, delta_next, mask=channel_ok & (tile == 0))

    # ---- next x_adv = (x·m + (1 − m)·δ − mean)/std from the updated mask ----
    m = _mask(theta)
    out = x * m[None, :] + (1.0 - m)[None, :] * delta_next[:, None]
    if HAS_NORM:
        out = (out - mean[:, None]) / std[:, None]
    tl.store(out_ptr + image_offset[:, None] + offs[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_mask)


# ---------------------------------------------------------------- host
def _fp32_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _as_int32(value: int) -> int:
    """The int32 with the bits of ``value mod 2³²``: kernel scalars ≥ 2³¹ would not stay 32-bit."""
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def _check_shapes(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if theta.dim() != 4 or theta.shape[1] not in (1, c) or (theta.shape[0], *theta.shape[2:]) != (n, h, w):
        raise ValueError(f"theta: expected (N, 1 or C, H, W) = ({n}, 1 or {c}, {h}, {w}), got {tuple(theta.shape)}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != theta.shape:
            raise ValueError(f"{name}: expected theta's shape {tuple(theta.shape)}, got {tuple(t.shape)}")
    if grad_xadv.shape != x.shape:
        raise ValueError(f"grad_xadv: expected x's shape {tuple(x.shape)}, got {tuple(grad_xadv.shape)}")
    if delta.dim() != 4 or delta.shape[2:] != (1, 1):
        raise ValueError(f"delta: expected (N, C, 1, 1), got {tuple(delta.shape)}")
    if seeds.numel() != n:
        raise ValueError(f"seeds: expected {n} values (one per sample), got {seeds.numel()}")
    if (mean is None) != (std is None):
        raise ValueError("mean, std: expected both or neither, got only "
                         f"{'mean' if std is None else 'std'}")
    for name, t in (("mean", mean), ("std", std)):
        if t is not None and t.numel() != c:
            raise ValueError(f"{name}: expected {c} values (one per channel), got {t.numel()}")
    if h * w == 0:
        raise ValueError(f"x: expected a non-empty plane, got H×W = {h}×{w}")


def mask_step_triton(theta: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, x: torch.Tensor,
                     delta: torch.Tensor, grad_xadv: torch.Tensor, seeds: torch.Tensor, params: MaskStepParams,
                     mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, *, block_size: int | None = None,
                     num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`trojanguard.ops.mask_step_reference`, same arguments and results.

    ``theta``, ``exp_avg``, ``exp_avg_sq``: (N, M, H, W), updated in place; ``x``, ``grad_xadv``: (N, C, H, W);
    ``delta``: (N, C, 1, 1); ``seeds``: (N,) integers; ``mean``, ``std``: (C,) or None. Returns
    ``(delta_next (N, C, 1, 1) fp32, x_adv_next (N, C, H, W) in out_dtype or x.dtype)``. ``block_size``
    (pixels per program, a power of two) and ``num_warps`` override the automatic choice; tests use the first to
    force many tiles, ``benchmarks/roofline.py --sweep`` both to measure the choice.
    """
    _check_shapes(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std)
    n, c, h, w = x.shape
    m = theta.shape[1]
    device = x.device
    delta_next = torch.empty(n, c, 1, 1, dtype=torch.float32, device=device)
    x_adv = torch.empty(n, c, h, w, dtype=out_dtype or x.dtype, device=device)
    if n == 0:
        return delta_next, x_adv

    state = (theta, exp_avg, exp_avg_sq)
    work = [_fp32_contiguous(t) for t in state]  # the caller's tensors themselves when already fp32 contiguous
    x_c = x.contiguous()
    grad_c = grad_xadv.contiguous()
    delta_c = delta.to(torch.float32).expand(n, c, 1, 1).reshape(n, c).contiguous()
    seeds_c = seeds.to(device=device, dtype=torch.int64).reshape(n).contiguous()
    has_norm = mean is not None
    if has_norm:
        mean_c = mean.to(device=device, dtype=torch.float32).reshape(c).contiguous()
        std_c = std.to(device=device, dtype=torch.float32).reshape(c).contiguous()
    else:
        mean_c = std_c = delta_c  # never read

    channels = c if m == 1 else 1
    block_c = triton.next_power_of_2(channels)
    hw = h * w
    if block_size is None:
        block_size = min(triton.next_power_of_2(hw), MAX_BLOCK, max(MIN_BLOCK, TILE_ELEMENTS // block_c))
    elif block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two, got {block_size}")
    tiles = triton.cdiv(hw, block_size)
    grid = (n * m * tiles,)
    if num_warps is None:
        num_warps = min(8, max(4, block_size * block_c // ELEMENTS_PER_WARP))

    has_halo = tiles > 1
    if has_halo:
        halo = torch.empty(n * m * tiles * 2 * w, dtype=torch.float32, device=device)
        _mask_step_halo_kernel[grid](work[0], halo, hw, w, tiles, BLOCK=block_size,
                                     BLOCK_W=min(triton.next_power_of_2(w), 1024))
    else:
        halo = work[0]  # never read

    _mask_step_fwd_kernel[grid](
        work[0], work[1], work[2], x_c, delta_c, grad_c, seeds_c, mean_c, std_c,
        halo, delta_next, x_adv,
        c, m, h, w, hw, tiles, channels,
        params.beta1, 1 - params.beta1, params.beta2, 1 - params.beta2, params.eps, params.step_size,
        params.bias_correction2_sqrt, params.l1_weight, params.tv_weight, 2.0 / hw, _as_int32(params.step + 1),
        HAS_NORM=has_norm, HAS_HALO=has_halo, BLOCK=block_size, BLOCK_C=block_c, num_warps=num_warps,
    )
    for original, updated in zip(state, work, strict=True):
        if updated is not original:
            original.copy_(updated)
    return delta_next, x_adv
