import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from conftest import random_mask
from segpipe.config import DataConfig
from segpipe.transforms import BlurNormalizeBatch, RandomScaleCrop, gaussian_blur, train_transform

IGNORE = 255


def encoded_pair(seed: int, h=64, w=96, classes=4):
    """A mask and an image whose pixel value is a function of the class, so any misalignment shows."""
    mask = torch.from_numpy(random_mask(np.random.default_rng(seed), h, w, classes)).to(torch.uint8)
    image = torch.stack([mask * 60, mask * 30 + 10, 250 - mask * 50]).to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 5x5 neighbourhood has one class: resampling cannot blend colours there."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, 5, 1, 2)
    lo = -torch.nn.functional.max_pool2d(-m, 5, 1, 2)
    return (hi == lo)[0, 0]


@pytest.mark.parametrize("seed", range(12))
def test_image_and_mask_stay_aligned_under_train_transform(seed):
    cfg = DataConfig(crop_size=[48, 56], scale_range=[0.5, 2.0], ignore_index=IGNORE, blur_prob=0.0,
                     color_jitter=0.0, mean=[0, 0, 0], std=[1, 1, 1])
    image, mask = encoded_pair(seed)
    torch.manual_seed(seed)
    out_image, out_mask = train_transform(cfg)(image, mask)
    assert out_image.shape == (3, 48, 56) and out_mask.shape == (48, 56)
    assert out_image.dtype == torch.float32 and out_mask.dtype == torch.uint8
    expected = torch.stack([out_mask * 60, out_mask * 30 + 10, 250 - out_mask.int() * 50]).float() / 255
    labelled = out_mask != IGNORE
    check = interior(out_mask) & labelled
    assert check.sum() > 50
    assert torch.allclose(out_image[:, check], expected[:, check], atol=2 / 255)
    assert torch.all(out_image[:, ~labelled] == 0)  # padding: black image, ignored mask


def test_mask_is_never_blurred_jittered_or_normalised():
    cfg = DataConfig(crop_size=[48, 56], blur_prob=1.0, color_jitter=0.4, ignore_index=IGNORE)
    image, mask = encoded_pair(3)
    for seed in range(5):
        torch.manual_seed(seed)
        _, out_mask = train_transform(cfg)(image, mask)
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {IGNORE}


def test_scale_crop_pads_mask_with_ignore_when_image_is_small():
    image, mask = encoded_pair(0, h=20, w=24)
    out_image, out_mask = RandomScaleCrop([64, 64], [1.0, 1.0], IGNORE)(image, mask)
    assert out_mask.shape == (64, 64)
    assert torch.equal(out_mask[:20, :24], mask) and torch.all(out_mask[20:] == IGNORE)
    assert torch.equal(out_image[:, :20, :24], image)


def test_scale_crop_scale_distribution_matches_resize_then_crop():
    """At scale 2 a crop covers half the source height: the mask content equals resize-then-crop."""
    image, mask = encoded_pair(1, h=32, w=32)
    torch.manual_seed(0)
    t = RandomScaleCrop([64, 64], [2.0, 2.0], IGNORE)
    _, out_mask = t(image, mask)
    reference = F.resize(mask, [64, 64])
    assert (out_mask == reference).float().mean() > 0.97


def test_blur_matches_torchvision():
    x = torch.rand(3, 30, 40)
    expected = F.gaussian_blur(x, [5, 5], [1.3, 1.3])
    assert torch.allclose(gaussian_blur(x, 5, 1.3), expected, atol=1e-5)


def test_fused_normalisation_matches_todtype_then_normalize():
    from torchvision.transforms import v2
    from segpipe.transforms import ToNormalizedFloat
    image, mask = encoded_pair(2)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    fused, same_mask = ToNormalizedFloat(mean, std)(image, mask)
    reference = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(image))
    assert torch.allclose(fused, reference, atol=1e-5) and torch.equal(same_mask, mask)
    assert isinstance(fused, tv_tensors.Image)


def test_blur_matches_torchvision_on_a_batch_of_uint8():
    x = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8)
    expected = F.gaussian_blur(x.float(), [5, 5], [0.7, 0.7])
    assert torch.allclose(gaussian_blur(x, 5, 0.7), expected, atol=1e-4)


def test_fused_blur_and_normalisation_match_todtype_blur_normalize():
    from torchvision.transforms import v2
    from segpipe.transforms import ToNormalizedFloat
    image, mask = encoded_pair(3)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    fused, same_mask = ToNormalizedFloat(mean, std, 5, (1.3, 1.3), blur_prob=1.0)(image, mask)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.GaussianBlur(5, sigma=1.3),
                            v2.Normalize(mean, std)])(image)
    assert torch.allclose(fused, reference, atol=1e-5) and torch.equal(same_mask, mask)
    assert fused.is_contiguous() and isinstance(fused, tv_tensors.Image)
    unblurred, _ = ToNormalizedFloat(mean, std, 5, (1.3, 1.3), blur_prob=0.0)(image, mask)
    assert not torch.allclose(unblurred, reference, atol=1e-2)


def test_blur_commutes_with_normalisation():
    x = torch.rand(3, 20, 30)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.3, 0.25]).view(3, 1, 1)
    assert torch.allclose(gaussian_blur((x - mean) / std, 5, 1.4), (gaussian_blur(x, 5, 1.4) - mean) / std, atol=1e-5)


def test_blur_on_device_gives_the_workers_augmentation_for_the_same_seeds():
    cfg = DataConfig(crop_size=[40, 48], scale_range=[0.5, 2.0], ignore_index=IGNORE, blur_prob=0.5)
    in_workers, deferred = train_transform(cfg), train_transform(cfg, blur_on_device=True)
    expected, crops, masks, sigmas = [], [], [], []
    for seed in range(8):
        image, mask = encoded_pair(seed)
        torch.manual_seed(seed)
        expected.append(in_workers(image, mask))
        torch.manual_seed(seed)
        crop, crop_mask, sigma = deferred(image, mask)
        assert crop.dtype == torch.uint8 and torch.equal(crop_mask, expected[-1][1])
        crops.append(crop), masks.append(crop_mask), sigmas.append(sigma)
    assert 0 < sum(float(s) > 0 for s in sigmas) < len(sigmas)  # some blurred, some not
    batch = BlurNormalizeBatch(cfg.mean, cfg.std, cfg.blur_kernel)(torch.stack(crops), torch.stack(sigmas))
    assert torch.allclose(batch, torch.stack([image for image, _ in expected]), atol=1e-4)


def test_blur_on_device_refuses_colour_jitter():
    with pytest.raises(ValueError, match="data.augment_on=workers"):
        train_transform(DataConfig(color_jitter=0.2), blur_on_device=True)
