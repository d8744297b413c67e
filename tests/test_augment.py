import torch

from dfkd_assets.core.augment import N_PARAMS, AugmentSpec, ImageRngs, augment_views, crop_resize, cutout_boxes


def test_full_box_crop_equals_image():
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0]], [[0.0, 0.0, 16.0, 16.0]]])
    torch.testing.assert_close(crop_resize(x, boxes, 16), x, atol=1e-5, rtol=0)


def test_crop_is_differentiable_and_per_image():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0]], [[8.0, 8.0, 16.0, 16.0]]])
    out = crop_resize(x, boxes, 8)
    torch.testing.assert_close(out[1], x[1, :, 8:, 8:].detach(), atol=1e-5, rtol=0)
    out.sum().backward()
    assert x.grad[0, :, :8, :8].abs().sum() > 0 and x.grad[0, :, 8:, 8:].abs().sum() == 0


def test_cutouts_stay_inside_and_respect_sizes():
    u = torch.rand(4, 100, N_PARAMS)
    b = cutout_boxes(u, 32, 48, out_size=16, cut_pow=1.0)
    side = b[..., 2] - b[..., 0]
    assert (b[..., 0] >= 0).all() and (b[..., 2] <= 48).all() and (b[..., 3] <= 32).all()
    assert (side >= 16).all() and (side <= 32).all()
    torch.testing.assert_close(side, b[..., 3] - b[..., 1])


def test_no_augmentation_is_identity():
    v = torch.rand(5, 3, 16, 16)
    out = augment_views(v, torch.rand(5, N_PARAMS), AugmentSpec(p=0.0, noise_max=0.0), None)
    torch.testing.assert_close(out, v, atol=1e-5, rtol=0)


def test_augmentation_changes_views_and_keeps_gradients():
    v = torch.rand(8, 3, 16, 16, requires_grad=True)
    out = augment_views(v, torch.rand(8, N_PARAMS), AugmentSpec(p=1.0, noise_max=0.1), torch.randn(8, 3, 16, 16))
    assert (out - v).abs().mean() > 0.01
    out.sum().backward()
    assert v.grad.abs().sum() > 0


def test_per_image_streams_do_not_depend_on_batch():
    a = ImageRngs([1, 2, 3], torch.device("cpu")).uniform(4, N_PARAMS)
    b = ImageRngs([2], torch.device("cpu")).uniform(4, N_PARAMS)
    torch.testing.assert_close(a[1], b[0])
    assert not torch.allclose(a[0], a[1])


def test_whole_image_boxes_take_the_copy_path_with_roi_align_values_and_gradients():
    """At synthesis side == cut side every cutout is the whole image: the shortcut must equal roi_align."""
    from torchvision.ops import roi_align

    from dfkd_assets.core.augment import crop_resize

    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    boxes = torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(3, 4, 4).clone()
    fast = crop_resize(x, boxes, 16)
    (fast * torch.arange(fast.numel()).view_as(fast)).sum().backward()
    g_fast, x.grad = x.grad.clone(), None
    rois = torch.cat([torch.arange(3.0).repeat_interleave(4)[:, None], boxes.reshape(-1, 4)], 1)
    slow = roi_align(x, rois, output_size=16, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    (slow * torch.arange(slow.numel()).view_as(slow)).sum().backward()
    assert torch.equal(fast, slow)
    torch.testing.assert_close(g_fast, x.grad)
