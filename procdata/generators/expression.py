"""Random expression-tree shaders: a different program per image, run as one tensor program per batch."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from procdata.generators.registry import register
from procdata.generators.streams import grouped, image_uniforms, pixel_grid

LEAF_KINDS = ("wave", "ring", "ramp")
NODE_OPS = ("mean", "product", "max", "min", "warp", "fold", "left")     # fold and left use one child
LEAF_PARAMS, NODE_PARAMS, FRAME_PARAMS, COLOUR_PARAMS = 7, 3, 6, 9


@register("expression")
def expression(seed: int, indices: Sequence[int], size: int, device: torch.device, depth: int = 4,
               max_freq: float = 6.0) -> torch.Tensor:
    """Random expression trees over the pixel coordinates, one tree per image, through a palette.

    Each image draws a tree of up to ``depth`` levels of binary nodes over 2^depth leaves. A leaf
    is a field of the (zoomed, rotated, shifted) coordinates: an oriented wave sin(f·p + φ), a ring
    cos(f·|q − c| + φ) about a random centre, or a soft ramp tanh(f·p + o), with f log-uniform in
    [1, ``max_freq``] (most leaves slow, as natural images put most power at low frequencies). A
    node combines its two children, each in [−1, 1], into [−1, 1]: their mean, product, max, min,
    a warp sin(k·a + m·b), a fold of one (|2a| − 1) or the left child alone (so subtrees drop out
    and trees come in every shape and depth, not only complete ones). The root goes through a
    cosine palette whose three channels share frequency and phase up to a small offset, so the
    channels are correlated as in photographs.

    The batch runs level by level as ``[n, nodes, pixels]`` tensors; each leaf kind and node op
    runs on the (image, node) pairs that drew it only (``grouped``, rows moved by ``index_select``
    and ``index_copy_``: advanced indexing costs several times more on CPU), so a batch costs about
    3 + 7·depth tensor ops whatever its size, on any device. Pixels depend on (seed, index) only.
    """
    n, leaves = len(indices), 2 ** depth
    frame, leaf, node, colour = (part.to(device) for part in program_uniforms(seed, indices, depth))
    y, x = pixel_grid(size, device)
    y, x = (y.flatten(1) - 0.5) * 2, (x.flatten(1) - 0.5) * 2                 # [1, S·S] in [-1, 1]
    zoom, rot = 0.6 + 1.4 * frame[:, 0:1], frame[:, 1:2] * 2 * math.pi
    cos_z, sin_z = torch.cos(rot) * zoom, torch.sin(rot) * zoom
    u = (x * cos_z).sub_(y * sin_z).add_(frame[:, 2:3] - 0.5)                 # [n, S·S]
    v = (x * sin_z).add_(y * cos_z).add_(frame[:, 3:4] - 0.5)
    values = leaf_fields(u, v, leaf.reshape(n * leaves, LEAF_PARAMS), max_freq).view(n, leaves, size * size)
    value = combine_nodes(values, node)                                        # [n, S·S] in [-1, 1]

    # palette a + b·cos(2π(c·v + d + δ_channel)): one frequency and phase, channels offset a little
    offset = torch.cat([torch.zeros(n, 1, device=device), colour[:, 0:2] * 0.2], 1)[..., None]   # [n, 3, 1]
    a = 0.35 + 0.3 * colour[:, 2:3, None]
    b = (0.25 + 0.25 * colour[:, 3:4, None]) * (0.85 + 0.15 * colour[:, 6:9, None])
    c, d = 0.3 + 0.9 * colour[:, 4:5, None], colour[:, 5:6, None]
    image = (value[:, None] * (2 * math.pi * c)).add(2 * math.pi * (d + offset)).cos_().mul_(b).add_(a)
    return image.view(n, 3, size, size)


def leaf_fields(u: torch.Tensor, v: torch.Tensor, leaf: torch.Tensor, max_freq: float) -> torch.Tensor:
    """The leaves' fields, ``[n·L, S·S]``, one row per (image, leaf), from each image's coordinates
    ``u``, ``v`` ``[n, S·S]`` and the leaves' uniforms ``[n·L, 7]``."""
    n, leaves = u.shape[0], leaf.shape[0] // u.shape[0]
    image_of_leaf = torch.arange(n, device=u.device).repeat_interleave(leaves)
    kind = (leaf[:, 0] * len(LEAF_KINDS)).long().clamp_max_(len(LEAF_KINDS) - 1)
    freq = max_freq ** leaf[:, 1:2]                                            # log-uniform in [1, max_freq]
    angle, phase = leaf[:, 2:3] * math.pi, leaf[:, 3:4] * 2 * math.pi
    values = torch.empty(n * leaves, u.shape[1], device=u.device)
    for k, rows in grouped(kind, len(LEAF_KINDS)):
        if not len(rows):
            continue
        lu, lv = u.index_select(0, image_of_leaf[rows]), v.index_select(0, image_of_leaf[rows])   # copies
        f = freq[rows]
        if LEAF_KINDS[k] == "ring":
            cy, cx = leaf[rows, 4:5] * 2 - 1, leaf[rows, 5:6] * 2 - 1
            field = torch.hypot(lu.sub_(cx), lv.sub_(cy)).mul_(f).add_(phase[rows]).cos_()
        else:
            proj = lu.mul_(angle[rows].cos()).addcmul_(lv, angle[rows].sin())
            field = (proj.mul_(f).add_(phase[rows]).sin_() if LEAF_KINDS[k] == "wave" else
                     proj.mul_(f).add_(leaf[rows, 6:7] * 2 - 1).tanh_())
        values.index_copy_(0, rows, field)
    return values


def combine_nodes(values: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """The trees' roots ``[n, S·S]`` from their leaves ``values`` ``[n, L, S·S]`` and nodes' uniforms
    ``[n, L − 1, 3]`` (heap order), bottom up: level l has 2^l nodes, node j of a level combining
    children 2j and 2j+1 of the level below."""
    n, first = values.shape[0], node.shape[1]                                 # one past the level's last node
    while values.shape[1] > 1:
        width = values.shape[1] // 2
        first -= width
        a, b = values[:, 0::2].reshape(n * width, -1), values[:, 1::2].reshape(n * width, -1)
        params = node[:, first:first + width].reshape(n * width, NODE_PARAMS)
        op = (params[:, 0] * len(NODE_OPS)).long().clamp_max_(len(NODE_OPS) - 1)
        out = torch.empty_like(a)
        for k, rows in grouped(op, len(NODE_OPS)):
            if not len(rows):
                continue
            name, left = NODE_OPS[k], a.index_select(0, rows)                    # copies: ops work in place
            right = b.index_select(0, rows) if name not in ("fold", "left") else None
            if name == "mean":
                result = left.add_(right).mul_(0.5)
            elif name == "product":
                result = left.mul_(right)
            elif name == "max":
                result = torch.maximum(left, right)
            elif name == "min":
                result = torch.minimum(left, right)
            elif name == "warp":
                k1, k2 = 1 + 2 * params[rows, 1:2], 1 + 2 * params[rows, 2:3]
                result = left.mul_(k1).addcmul_(right, k2).sin_()
            elif name == "fold":
                result = left.abs_().mul_(2).sub_(1)
            else:
                result = left
            out.index_copy_(0, rows, result)
        values = out.view(n, width, -1)
    return values[:, 0]


def program_uniforms(seed: int, indices: Sequence[int], depth: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's program as uniforms (CPU): frame ``[n, 6]``, leaves ``[n, 2^depth, 7]`` (kind,
    frequency, angle, phase, centre y, x, ramp offset), nodes ``[n, 2^depth − 1, 3]`` in heap
    order (op, two warp gains) and palette ``[n, 9]``, from the counter-based hash of (seed, index)."""
    if depth < 1:
        raise ValueError(f"expression depth must be >= 1, got {depth}")
    n, leaves = len(indices), 2 ** depth
    sizes = (FRAME_PARAMS, leaves * LEAF_PARAMS, (leaves - 1) * NODE_PARAMS, COLOUR_PARAMS)
    p = image_uniforms("expression", seed, indices, sum(sizes))
    frame, leaf, node, colour = p.split(sizes, 1)
    return frame, leaf.reshape(n, leaves, LEAF_PARAMS), node.reshape(n, leaves - 1, NODE_PARAMS), colour


def expression_programs(seed: int, indices: Sequence[int], depth: int = 4) -> list[str]:
    """Each image's expression tree as text, the subtrees its one-child nodes drop left out: what
    ``expression`` draws, for provenance and for tests (``max(wave, fold(ring))``)."""
    _, leaf, node, _ = program_uniforms(seed, indices, depth)
    leaf_kind = (leaf[..., 0] * len(LEAF_KINDS)).long().clamp_max_(len(LEAF_KINDS) - 1)
    node_op = (node[..., 0] * len(NODE_OPS)).long().clamp_max_(len(NODE_OPS) - 1)
    nodes = node.shape[1]

    def text(i: int, at: int) -> str:                      # heap order: children of node j are 2j+1, 2j+2
        if at >= nodes:
            return LEAF_KINDS[int(leaf_kind[i, at - nodes])]
        op = NODE_OPS[int(node_op[i, at])]
        left = text(i, 2 * at + 1)
        return left if op == "left" else f"{op}({left})" if op == "fold" else f"{op}({left}, {text(i, 2 * at + 2)})"

    return [text(i, 0) for i in range(len(indices))]
