import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from conftest import random_mask
from segpipe.config import DataConfig
from segpipe.transforms import SIGMA, PixelOps, TrainAugment, gaussian_blur, train_transform

IGNORE = 255


def encoded_pair(seed: int, h=64, w=96, classes=4):
    """A mask and an image whose pixel value is a function of the class, so any misalignment shows."""
    mask = torch.from_numpy(random_mask(np.random.default_rng(seed), h, w, classes)).to(torch.uint8)
    image = torch.stack([mask * 60, mask * 30 + 10, 250 - mask * 50]).to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def interior(mask: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Pixels whose size x size neighbourhood has one class: resampling cannot blend colours there."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, size, 1, size // 2)
    lo = -torch.nn.functional.max_pool2d(-m, size, 1, size // 2)
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


CLASS_COLOURS = torch.tensor([[40, 150, 60], [150, 40, 100], [90, 90, 160], [160, 130, 40]], dtype=torch.uint8)


@pytest.mark.parametrize("augment", [dict(), dict(hflip_prob=1.0), dict(train_size=[50, 70]),
                                     dict(scale_range=[0.5, 0.6]), dict(blur_prob=1.0, blur_sigma=[1.5, 2.0]),
                                     dict(color_jitter=0.4),
                                     dict(hflip_prob=0.5, blur_prob=0.5, color_jitter=0.4, train_size=[70, 90])])
@pytest.mark.parametrize("seed", range(4))
def test_image_and_mask_stay_aligned_under_every_augmentation(augment, seed):
    """Every pixel step is one colour map per image (blur keeps uniform regions), so after any augmentation each
    mask label, padding's ignore_index included, must still cover one colour, a different one for each label."""
    base = dict(crop_size=[48, 56], scale_range=[0.5, 2.0], ignore_index=IGNORE, hflip_prob=0.0, blur_prob=0.0)
    cfg = DataConfig(**{**base, **augment})
    blocks = torch.from_numpy(random_mask(np.random.default_rng(seed), 40, 48, len(CLASS_COLOURS)))
    mask = blocks.repeat_interleave(2, 0).repeat_interleave(2, 1).to(torch.uint8)  # 16-pixel blocks, 80x96
    image = tv_tensors.Image(CLASS_COLOURS[mask.long()].permute(2, 0, 1).contiguous())
    torch.manual_seed(seed)
    out_image, out_mask = train_transform(cfg)(image, tv_tensors.Mask(mask))
    check = interior(out_mask, 9)  # resampling (2 pixels) and the blur (2 more) stay inside one label
    assert check.sum() > 100
    colours = []
    for label in out_mask[check].unique():
        pixels = out_image[:, check & (out_mask == label)]
        colours.append(pixels.median(1).values)
        assert (pixels - colours[-1][:, None]).abs().max() < 1e-3, f"label {int(label)} covers several colours"
    assert len(colours) >= 2
    distances = [(a - b).abs().max() for i, a in enumerate(colours) for b in colours[i + 1:]]
    assert min(distances) > 0.05, "two labels cover the same colour"


def test_mask_is_never_blurred_jittered_or_normalised():
    cfg = DataConfig(crop_size=[48, 56], blur_prob=1.0, color_jitter=0.4, ignore_index=IGNORE)
    image, mask = encoded_pair(3)
    for seed in range(5):
        torch.manual_seed(seed)
        _, out_mask = train_transform(cfg)(image, mask)
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {IGNORE}


def geometric_only(crop_size, scale_range) -> TrainAugment:
    """The train preset stopping at the uint8 crop (pixels_on_device), with no flip."""
    return TrainAugment(DataConfig(crop_size=crop_size, scale_range=scale_range, ignore_index=IGNORE, hflip_prob=0.0),
                        pixels_on_device=True)


def test_scale_crop_pads_mask_with_ignore_when_image_is_small():
    image, mask = encoded_pair(0, h=20, w=24)
    out_image, out_mask, _ = geometric_only([64, 64], [1.0, 1.0])(image, mask)
    assert out_mask.shape == (64, 64)
    assert torch.equal(out_mask[:20, :24], mask) and torch.all(out_mask[20:] == IGNORE)
    assert torch.equal(out_image[:, :20, :24], image)


def test_scale_crop_scale_distribution_matches_resize_then_crop():
    """At scale 2 a crop covers half the source height: the mask content equals resize-then-crop."""
    image, mask = encoded_pair(1, h=32, w=32)
    torch.manual_seed(0)
    _, out_mask, _ = geometric_only([64, 64], [2.0, 2.0])(image, mask)
    reference = F.resize(mask, [64, 64])
    assert (out_mask == reference).float().mean() > 0.97


def test_blur_matches_torchvision():
    x = torch.rand(3, 30, 40)
    expected = F.gaussian_blur(x, [5, 5], [1.3, 1.3])
    assert torch.allclose(gaussian_blur(x, 5, 1.3), expected, atol=1e-5)


def pixel_rows(*sigmas: float) -> torch.Tensor:
    """Pixel-parameter rows (TrainAugment.draw's layout) with these blur sigmas and no colour jitter."""
    rows = torch.zeros(len(sigmas), 8)
    rows[:, SIGMA] = torch.tensor(sigmas)
    return rows


def test_fused_normalisation_matches_todtype_then_normalize():
    from torchvision.transforms import v2
    image, _ = encoded_pair(2)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    fused = PixelOps(mean, std, 5)(image[None], pixel_rows(0.0))[0]
    reference = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(image))
    assert torch.allclose(fused, reference, atol=1e-5)


def test_blur_matches_torchvision_on_a_batch_of_uint8():
    x = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8)
    expected = F.gaussian_blur(x.float(), [5, 5], [0.7, 0.7])
    assert torch.allclose(gaussian_blur(x, 5, 0.7), expected, atol=1e-4)


def test_fused_blur_and_normalisation_match_todtype_blur_normalize():
    from torchvision.transforms import v2
    image, _ = encoded_pair(3)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    fused = PixelOps(mean, std, 5)(image[None], pixel_rows(1.3))[0]
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.GaussianBlur(5, sigma=1.3),
                            v2.Normalize(mean, std)])(image)
    assert torch.allclose(fused, reference, atol=1e-5)
    assert fused.is_contiguous()
    unblurred = PixelOps(mean, std, 5)(image[None], pixel_rows(0.0))[0]
    assert not torch.allclose(unblurred, reference, atol=1e-2)


def test_colour_jitter_is_torchvisions_for_the_same_draws():
    """The jittered path equals v2's ToDtype, GaussianBlur, ColorJitter, Normalize with the factors drawn."""
    from torchvision.transforms import v2
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ops = PixelOps(mean, std, 5, color_jitter=0.4)
    image, _ = encoded_pair(4)
    rows = pixel_rows(1.1, 1.1)
    rows[:, 1:4] = torch.tensor([[1.3, 0.7, 0.65], [0.8, 1.25, 1.35]])  # brightness, contrast, saturation
    rows[:, 4:8] = torch.tensor([[2.0, 0, 3, 1], [1, 3, 0, 2]])  # the order torchvision draws (3 = hue: off)
    out = ops(torch.stack([image, image]), rows)
    for row, got in zip(rows, out):
        b, c, sat = row[1:4].tolist()
        order = [int(i) for i in row[4:8]]
        jitter = [v2.ColorJitter(brightness=(b, b)), v2.ColorJitter(contrast=(c, c)), v2.ColorJitter(saturation=(sat, sat))]
        reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.GaussianBlur(5, sigma=1.1),
                                *[jitter[i] for i in order if i < 3], v2.Normalize(mean, std)])(image)
        assert torch.allclose(got, reference, atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-2)  # each image its own factors and order


def test_blur_commutes_with_normalisation():
    x = torch.rand(3, 20, 30)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.3, 0.25]).view(3, 1, 1)
    assert torch.allclose(gaussian_blur((x - mean) / std, 5, 1.4), (gaussian_blur(x, 5, 1.4) - mean) / std, atol=1e-5)


@pytest.mark.parametrize("augment", [dict(blur_prob=0.5), dict(blur_prob=0.0), dict(blur_prob=1.0),
                                     dict(blur_prob=0.5, color_jitter=0.4), dict(blur_prob=0.0, color_jitter=0.3)])
def test_pixel_work_on_the_device_gives_the_workers_tensors_bit_for_bit(augment):
    """The same seeds give identical tensors whether PixelOps runs per sample in the workers or per batch."""
    cfg = DataConfig(crop_size=[40, 48], scale_range=[0.5, 2.0], ignore_index=IGNORE, **augment)
    in_workers, deferred = train_transform(cfg), train_transform(cfg, pixels_on_device=True)
    expected, crops, masks, rows = [], [], [], []
    for seed in range(8):
        image, mask = encoded_pair(seed)
        torch.manual_seed(seed)
        expected.append(in_workers(image, mask))
        assert isinstance(expected[-1][0], tv_tensors.Image) and expected[-1][0].dtype == torch.float32
        torch.manual_seed(seed)
        crop, crop_mask, row = deferred(image, mask)
        assert crop.dtype == torch.uint8 and torch.equal(crop_mask, expected[-1][1])
        crops.append(crop), masks.append(crop_mask), rows.append(row)
    blurred = {float(row[SIGMA]) > 0 for row in rows}
    assert blurred == {0.0: {False}, 0.5: {False, True}, 1.0: {True}}[cfg.blur_prob]  # p=0.5: a mixed batch
    batch = PixelOps.from_config(cfg)(torch.stack(crops), torch.stack(rows))
    assert torch.equal(batch, torch.stack([image for image, _ in expected]))


def test_colour_jitter_changes_colours_only_when_enabled():
    image, mask = encoded_pair(5)
    plain, jittered = (train_transform(DataConfig(crop_size=[40, 48], blur_prob=0.0, color_jitter=j)) for j in (0, 0.4))
    torch.manual_seed(0)
    a, mask_a = plain(image, mask)
    torch.manual_seed(0)
    b, mask_b = jittered(image, mask)
    assert torch.equal(mask_a, mask_b)  # the geometric draws come first, so jitter leaves the crop alone
    assert not torch.allclose(a, b, atol=1e-2)
