"""transforms.v2 presets for training and evaluation, applied to tv_tensors.Image and tv_tensors.Mask together.

The train preset is defined once, in TrainAugment: draw() makes every random choice of a sample in one fixed
order (scale + crop box, flip, blur sigma, colour jitter), the geometric steps apply the box and the flip to image
and mask in the loader workers, and PixelOps does the pixel work (blur, colour jitter, normalisation) on a batch
of uint8 crops, each image with its own row of parameters: in the workers on a batch of one, or on the training
device on the whole batch (data.augment_on=device), with the same result for the same seed.

The costly steps run on the crop, not the full image: the random scale is folded into the crop (crop the window
that will survive, then resize only it), the image stays uint8 until the crop is done, and without colour jitter
the blur is two 1-D channels_last depthwise convolutions carrying the normalisation in their weights, several
times cheaper than v2.GaussianBlur followed by v2.Normalize.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# A sample's row of pixel parameters (float32): its blur sigma (0: not blurred), then, with colour jitter, the
# brightness, contrast and saturation factors and the order torchvision's ColorJitter applies them in.
SIGMA, JITTER_FACTORS, JITTER_ORDER = 0, slice(1, 4), slice(4, 8)
PIXEL_PARAMS = 8


@dataclass(frozen=True)
class SampleAugment:
    """Every random choice made for one training sample (TrainAugment.draw)."""

    box: tuple[int, int, int, int]  # top, left, height, width of the source window that survives the crop
    out: tuple[int, int]  # that window's size once scaled: crop_size, less where the scaled image ends
    flip: bool
    pixels: torch.Tensor  # (PIXEL_PARAMS,) float32, the row PixelOps reads


class TrainAugment:
    """The train preset: random scale + crop and horizontal flip on uint8, then PixelOps (blur, colour jitter,
    normalisation). Called on (image, mask); returns (float image, mask), or with pixels_on_device
    (uint8 crop, mask, its pixel parameters) for PixelOps to finish the batch on the training device.

    The random scale is equal in distribution to v2.RandomResize + v2.RandomCrop(pad_if_needed), but only the
    crop is resized; crops are padded where the image ends, with 0 for the image and ignore_index for the mask.
    cfg.train_size (h, w) makes the scale relative to that size instead of the decoded one (reduced-size JPEG
    decoding).
    """

    def __init__(self, cfg, pixels_on_device: bool = False):
        self.crop_h, self.crop_w = cfg.crop_size
        self.scale_range, self.base_size = tuple(cfg.scale_range), cfg.train_size
        self.ignore_index, self.hflip_prob = cfg.ignore_index, cfg.hflip_prob
        self.blur_prob, self.blur_sigma = cfg.blur_prob, tuple(cfg.blur_sigma)
        self.pixel_ops = PixelOps.from_config(cfg)
        self.pixels_on_device = pixels_on_device

    def draw(self, size: Sequence[int]) -> SampleAugment:
        """Every random choice for an image of size (h, w), from torch's global generator in one fixed order."""
        h, w = size
        s = torch.empty(1).uniform_(*self.scale_range).item()
        sy = sx = s
        if self.base_size is not None:
            sy, sx = s * self.base_size[0] / h, s * self.base_size[1] / w
        scaled_h, scaled_w = max(1, round(h * sy)), max(1, round(w * sx))
        # Pick the crop in scaled coordinates (as RandomCrop would), then map it back to source pixels.
        top = int(torch.randint(0, max(scaled_h - self.crop_h, 0) + 1, ()).item())
        left = int(torch.randint(0, max(scaled_w - self.crop_w, 0) + 1, ()).item())
        out_h, out_w = min(self.crop_h, scaled_h - top), min(self.crop_w, scaled_w - left)
        y0, x0 = math.floor(top / sy), math.floor(left / sx)
        y1, x1 = min(h, max(y0 + 1, round((top + out_h) / sy))), min(w, max(x0 + 1, round((left + out_w) / sx)))
        flip = bool(torch.rand(1) < self.hflip_prob)  # v2.RandomHorizontalFlip's draw and comparison
        pixels = torch.zeros(PIXEL_PARAMS)
        if self.blur_prob > 0 and torch.rand(()).item() < self.blur_prob:
            pixels[SIGMA] = torch.empty(1).uniform_(*self.blur_sigma).item()
        if self.pixel_ops.jitter is not None:  # torchvision's own draw: order, then the three factors
            jitter = self.pixel_ops.jitter.make_params([])
            pixels[JITTER_FACTORS] = torch.tensor([jitter["brightness_factor"], jitter["contrast_factor"],
                                                   jitter["saturation_factor"]])
            pixels[JITTER_ORDER] = jitter["fn_idx"].float()
        return SampleAugment((y0, x0, y1 - y0, x1 - x0), (out_h, out_w), flip, pixels)

    def geometric(self, image: tv_tensors.Image, mask: tv_tensors.Mask,
                  params: SampleAugment) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The scaled crop and the flip of params, applied to image and mask alike (dtypes unchanged)."""
        image, mask = self.scale_crop(image, params), self.scale_crop(mask, params)
        if params.flip:
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        return image, mask

    def scale_crop(self, inpt: tv_tensors.Image | tv_tensors.Mask, params: SampleAugment):
        """Crop params.box, resize it to params.out, pad to crop_size."""
        y0, x0, bh, bw = params.box
        out_h, out_w = params.out
        out = F.crop(inpt, y0, x0, bh, bw)
        out = F.resize(out, [out_h, out_w], antialias=True)  # v2 resizes tv_tensors.Mask with nearest
        pad_h, pad_w = self.crop_h - out_h, self.crop_w - out_w
        if pad_h or pad_w:
            fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
            out = F.pad(out, [0, 0, pad_w, pad_h], fill=fill)
        return out

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple:
        params = self.draw(F.get_size(image))
        image, mask = self.geometric(image, mask, params)
        if self.pixels_on_device:
            return image, mask, params.pixels
        out = self.pixel_ops(image.as_subclass(torch.Tensor)[None], params.pixels[None])[0]
        return tv_tensors.wrap(out, like=image), mask


class PixelOps:
    """The train preset's pixel work on a uint8 (N, 3, H, W) batch, one parameter row per image
    (SampleAugment.pixels, on the CPU): Gaussian blur, colour jitter, normalisation; float32 out.

    The one implementation: the loader workers run it on a batch of one, the training step on the whole batch
    (data.augment_on=device). Each step treats every image on its own, so an image comes out the same, bit for
    bit on one device, in either place. Which images to blur is read from the CPU parameters: no device sync.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], blur_kernel: int, color_jitter: float = 0.0):
        if blur_kernel % 2 != 1:
            raise ValueError(f"data.blur_kernel must be odd, got {blur_kernel}")
        self.kernel_size = blur_kernel
        self.mean, self.std = torch.tensor(list(mean)), torch.tensor(list(std))
        self.scale, self.shift = normalisation_affine(mean, std)
        j = color_jitter
        self.jitter = v2.ColorJitter(brightness=j, contrast=j, saturation=j) if j > 0 else None

    @classmethod
    def from_config(cls, cfg) -> PixelOps:
        """The pixel work of the train preset for a DataConfig (the training step's half with augment_on=device)."""
        return cls(cfg.mean, cfg.std, cfg.blur_kernel, cfg.color_jitter)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The normalised float batch for uint8 images (N, 3, H, W) and their parameter rows (N, PIXEL_PARAMS)."""
        device = images.device
        if self.scale.device != device:  # copied to the device once, not on every batch
            self.mean, self.std, self.scale, self.shift = (t.to(device) for t in (self.mean, self.std, self.scale,
                                                                                  self.shift))
        params = params.cpu()
        sigmas = params[:, SIGMA].to(device, non_blocking=True)  # asynchronous: no wait for the device
        blurred = params[:, SIGMA] > 0
        if self.jitter is None:  # a normalised blur commutes with the per-channel affine normalisation: one pass
            return split_rows(
                images, blurred,
                lambda x, rows: gaussian_blur(x, self.kernel_size, sigmas[rows], self.scale, self.shift),
                lambda x, rows: torch.addcmul(self.shift.view(3, 1, 1), x.to(torch.float32), self.scale.view(3, 1, 1)))
        # Colour jitter blends and clamps [0, 1] colours, so normalising comes last.
        x = F.to_dtype(images, torch.float32, scale=True)
        x = split_rows(x, blurred, lambda x, rows: gaussian_blur(x, self.kernel_size, sigmas[rows]), lambda x, rows: x)
        # torchvision's colour kernels take one factor per call, hence one image at a time.
        x = torch.stack([self.jitter.transform(image, jitter_params(row)) for image, row in zip(x, params.tolist())])
        return F.normalize(x, self.mean, self.std)


def jitter_params(row: list[float]) -> dict:
    """v2.ColorJitter's parameters from a row of pixel parameters (as floats)."""
    brightness, contrast, saturation = row[JITTER_FACTORS]
    return dict(fn_idx=[int(i) for i in row[JITTER_ORDER]], brightness_factor=brightness,
                contrast_factor=contrast, saturation_factor=saturation, hue_factor=None)


def split_rows(x: torch.Tensor, chosen: torch.Tensor, if_chosen: Callable, otherwise: Callable) -> torch.Tensor:
    """if_chosen(x[rows], rows) for the rows where the CPU bool vector chosen is set, otherwise(x[rows], rows) for
    the rest, put back in x's order; a batch all of one kind goes through whole, uncopied. Deciding on the CPU
    keeps the device from waiting."""
    if chosen.all():
        return if_chosen(x, slice(None))
    if not chosen.any():
        return otherwise(x, slice(None))
    out = None
    for fn, rows in ((if_chosen, chosen.nonzero()[:, 0]), (otherwise, (~chosen).nonzero()[:, 0])):
        rows = rows.to(x.device, non_blocking=True)
        part = fn(x[rows], rows)
        if out is None:
            out = part.new_empty((len(x), *part.shape[1:]))
        out[rows] = part
    return out


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float | torch.Tensor,
                  scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gaussian blur of a (..., C, H, W) tensor with reflect padding, numerically like v2.GaussianBlur; float out.

    sigma is one value, or one per image of an (N, C, H, W) batch; 0 leaves that image unblurred.
    Two 1-D depthwise convolutions (1 x k, then k x 1) in channels_last layout: on this project's CPU that
    measured 1.4-1.7x faster than one k x k depthwise convolution, and 2-3x faster than the same on NCHW
    (oneDNN's NCHW depthwise kernels are slow for 3 channels). scale and shift (C values) apply x * scale + shift
    per channel on the way, folded into the first convolution's weight and bias: a normalised kernel commutes
    with it.
    """
    shape = image.shape
    c, h, w = shape[-3:]
    dtype = image.dtype if image.is_floating_point() else torch.float32
    flat = image.reshape(-1, c, h, w)
    n, half = flat.shape[0], kernel_size // 2
    x = torch.arange(-half, half + 1, dtype=dtype, device=image.device)
    sigma = torch.as_tensor(sigma, dtype=dtype, device=image.device).reshape(-1, 1).expand(n, 1)
    k = torch.exp(-0.5 * (x / sigma.clamp_min(1e-6)) ** 2)  # sigma 0: a unit impulse
    k = k / k.sum(1, keepdim=True)  # (n, kernel_size)
    row = k[:, None, :].expand(n, c, kernel_size)
    if scale is not None:
        row = row * scale.to(dtype=dtype, device=image.device).view(1, c, 1)
    bias = None if shift is None else shift.to(dtype=dtype, device=image.device).repeat(n)
    # The batch as one image of n * c channels, so every image gets its own kernel.
    padded = nnf.pad(flat.to(dtype).reshape(1, n * c, h, w), [half, half, half, half], mode="reflect")
    out = nnf.conv2d(padded.contiguous(memory_format=torch.channels_last), row.reshape(n * c, 1, 1, kernel_size),
                     bias, groups=n * c)
    out = nnf.conv2d(out, k.repeat_interleave(c, 0).reshape(n * c, 1, kernel_size, 1), groups=n * c)
    return out.contiguous().reshape(shape)  # collate stacks NCHW samples several times faster than channels_last


def normalisation_affine(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel with uint8 x * scale + shift == (x / 255 - mean) / std."""
    return torch.tensor([1 / (255 * s) for s in std]), torch.tensor([-m / s for m, s in zip(mean, std)])


def train_transform(cfg, pixels_on_device: bool = False) -> TrainAugment:
    """The train preset for a DataConfig; pixels_on_device leaves the pixel work to PixelOps in the training step."""
    return TrainAugment(cfg, pixels_on_device)


class EvalTransform:
    """Resize the image to eval_size (if set) and normalise; the mask stays at full resolution for scoring."""

    def __init__(self, eval_size: Optional[Sequence[int]], mean: Sequence[float], std: Sequence[float]):
        steps = [v2.Resize(list(eval_size), antialias=True)] if eval_size else []
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.image_transform = v2.Compose(steps)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        return self.image_transform(image), mask


def eval_transform(cfg) -> EvalTransform:
    """The evaluation preset for a DataConfig."""
    return EvalTransform(cfg.eval_size, cfg.mean, cfg.std)


def collate_eval(batch: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack the (equal-size) model inputs; keep the full-resolution masks as a list (their sizes may differ)."""
    images, masks = zip(*batch)
    return torch.stack([i.as_subclass(torch.Tensor) for i in images]), [m.as_subclass(torch.Tensor) for m in masks]
