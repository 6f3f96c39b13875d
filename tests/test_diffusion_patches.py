"""Patch-wise generation: the grid covers the image, groups never overlap, later patches see
exactly what earlier groups wrote, and the result does not depend on the batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcodec.diffusion.patches import PatchGrid, context_mask, generate_in_patches


@pytest.mark.parametrize("hw", [(512, 768), (200, 330), (129, 128)])
def test_grid_covers_the_canvas_and_groups_do_not_overlap(hw):
    grid = PatchGrid(*hw, patch=128, overlap=32)
    ch, cw = grid.canvas
    assert ch >= hw[0] and cw >= hw[1]
    cover = np.zeros((ch, cw), int)
    for group in grid.groups():
        in_group = np.zeros((ch, cw), int)
        for _, top, left in group:
            in_group[top : top + 128, left : left + 128] += 1
        assert in_group.max() == 1  # one group's patches are disjoint
        cover += in_group
    assert cover.min() >= 1
    with pytest.raises(ValueError, match="overlap"):
        PatchGrid(256, 256, patch=128, overlap=65)


def _ramp(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1)


def _offset_sampler(use_context: bool):
    """A stand-in for the diffusion sampler with the failure mode patches risk: every patch
    drifts by its own random offset, unless it continues the context it is given (each new
    pixel takes the drift of its nearest known pixel)."""
    from scipy import ndimage

    def sample(cond, ctx, mask, keys):
        drift = jax.vmap(lambda k: 0.3 * jax.random.normal(k, (3,)))(keys)
        out = cond + np.asarray(drift)[:, None, None, :]
        if use_context:
            for b in range(len(cond)):
                known = mask[b, ..., 0] > 0
                if known.any():
                    _, (ii, jj) = ndimage.distance_transform_edt(~known, return_indices=True)
                    out[b] = cond[b] + (ctx[b] - cond[b])[ii, jj]
        return out

    return sample


def _seam_ratio(image: np.ndarray, grid: PatchGrid) -> float:
    """Mean |horizontal gradient| across the columns where a later group's new pixels start,
    over the mean |horizontal gradient| elsewhere."""
    grad = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))
    starts = {left + grid.overlap - 1 for _, _, left in grid.groups()[1]}
    starts |= {left - 1 for _, _, left in grid.groups()[0] if left} | {
        left + grid.patch - grid.overlap - 1 for _, _, left in grid.groups()[1]
    }
    starts = sorted(c for c in starts if 0 <= c < len(grad))
    inside = np.delete(grad, starts)
    return float(grad[starts].mean() / inside.mean())


def test_later_groups_continue_from_earlier_ones_without_seams():
    cond = _ramp(512, 768)
    grid = PatchGrid(512, 768, patch=128, overlap=32)
    kw = dict(patch=128, overlap=32, batch=4, channels=3, key=jax.random.key(0))
    with_context = generate_in_patches(_offset_sampler(True), cond, feather=False, **kw)
    without = generate_in_patches(_offset_sampler(False), cond, feather=False, **kw)
    feathered = generate_in_patches(_offset_sampler(False), cond, **kw)
    assert _seam_ratio(without, grid) > 5.0  # the metric sees seams where they are
    assert _seam_ratio(with_context, grid) < 1.1  # within 10 % of the inside
    # A sampler that ignores its context: feathering still leaves no step at the borders.
    assert _seam_ratio(feathered, grid) < 0.5 * _seam_ratio(without, grid)
    # Group 0 drifts freely; everything else follows it.
    assert not np.allclose(with_context, cond)


def test_result_does_not_depend_on_the_batch_size():
    cond = _ramp(200, 330)
    kw = dict(patch=128, overlap=32, channels=3, key=jax.random.key(3))
    one = generate_in_patches(_offset_sampler(True), cond, batch=1, **kw)
    three = generate_in_patches(_offset_sampler(True), cond, batch=3, **kw)
    np.testing.assert_array_equal(one, three)
    assert one.shape == (200, 330, 3)


def test_small_images_are_generated_whole():
    seen = []

    def sample(cond, ctx, mask, keys):
        seen.append(cond.shape)
        return cond

    out = generate_in_patches(
        sample, _ramp(64, 128), patch=128, overlap=32, batch=4, channels=3, key=jax.random.key(0)
    )
    assert seen == [(1, 64, 128, 3)] and out.shape == (64, 128, 3)


def test_training_masks_look_like_decode_time_context():
    masks = np.asarray(context_mask(jax.random.key(0), 512, 32, 8))
    assert masks.shape == (512, 32, 32, 1) and set(np.unique(masks)) <= {0.0, 1.0}
    # The centre is never known; some masks are empty (group 0), some reach each border.
    assert masks[:, 8:24, 8:24].max() == 0
    empty = masks.reshape(512, -1).max(axis=1) == 0
    assert 0.2 < empty.mean() < 0.45
    for edge in (masks[:, 0, 16], masks[:, -1, 16], masks[:, 16, 0], masks[:, 16, -1]):
        assert 0.2 < edge.mean() < 0.55
    assert jnp.asarray(masks).dtype == jnp.float32
