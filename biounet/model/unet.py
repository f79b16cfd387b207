"""The 23-layer U-Net (Ronneberger et al. 2015) as in the OneFlow ISBI example, for either backend.

Module and parameter names match the original OneFlow example's `UNet(1, 1, bilinear=False)`
(`inc`, `down1..down4`, `up1..up4`, `outc`), so its published checkpoint loads.
"""
import numpy as np

from biounet.model.backend import F, flow, nn

NORMS = ("batch", "instance")
PADDINGS = ("same", "valid")


def norm_layer(kind, channels):
    """BatchNorm as in the paper's U-Net; InstanceNorm (each image normalized by its own statistics)
    for small-batch training on crops, where BatchNorm's running statistics fail at inference."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm must be 'batch' or 'instance', not {kind!r}")


def center_crop(x, height, width):
    """The central `height` x `width` of the last two axes of a tensor or array."""
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


def valid_input_size(output_size):
    """Smallest input side of the unpadded U-Net whose output covers `output_size` pixels.

    The unpadded net maps 16 b + 124 input pixels to 16 b - 60 (b >= 4: the bottom's size),
    e.g. 572 -> 388 as in the paper, 188 -> 4 the smallest."""
    bottom = max(4, -(-(output_size + 60) // 16))
    return 16 * bottom + 124


MIN_SIDE = 32  # the smallest side any padded U-Net takes (instance norm's; batch norm's is 16)


def smallest_side(norm):
    """Four halvings need 16 pixels; instance norm needs more than one pixel per channel at the bottom."""
    return MIN_SIDE if norm == "instance" else 16


VALID_MARGIN = 92  # (16 b + 124 - (16 b - 60)) / 2: input pixels lost on each side


def mirror_for_valid(array):
    """A numpy image (H x W or H x W x C) with mirrored borders, sized so the unpadded net's output starts at its
    first pixel and covers all of it (the paper's overlap-tile input)."""
    (height, width), m = array.shape[:2], VALID_MARGIN
    pads = [(m, valid_input_size(height) - height - m), (m, valid_input_size(width) - width - m)]
    return np.pad(array, pads + [(0, 0)] * (array.ndim - 2), mode="reflect")


class DoubleConv(nn.Module):
    """(3x3 conv => norm => ReLU) * 2; padding 0 for the paper's unpadded ("valid") network."""

    def __init__(self, in_channels, out_channels, mid_channels=None, norm="batch", padding=1):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=padding),
            norm_layer(norm, mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=padding),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pool, then DoubleConv."""

    def __init__(self, in_channels, out_channels, norm="batch", padding=1):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, norm=norm,
                                                                      padding=padding))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upsample x (2x2 transposed conv or bilinear), match it with the skip, concatenate, DoubleConv."""

    def __init__(self, in_channels, out_channels, bilinear=False, norm="batch", padding=1):
        super().__init__()
        self.crop_skip = padding == 0  # the unpadded net's skip is larger than the upsampled map
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, norm, padding)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels, norm=norm, padding=padding)

    def forward(self, x, skip):
        x = self.up(x)
        dy = skip.shape[2] - x.shape[2]
        dx = skip.shape[3] - x.shape[3]
        if self.crop_skip:
            skip = center_crop(skip, x.shape[2], x.shape[3])
        else:
            # Odd sizes: pooling floored them, so the upsampled map can be a pixel short of the skip.
            # Padded always (by 0 mostly), not under an `if`: an exported graph (export.py) keeps no
            # branch, and must pad at every size.
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(flow.cat([skip, x], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class UNet(nn.Module):
    """U-Net with `base` channels at the top level (64 in the paper), doubling at each of 4 levels.

    padding="same": any input of at least 16x16 pixels (32x32 with instance norm); the output has
    the input's size.
    padding="valid": the paper's unpadded network; sides of 16 b + 124 pixels give 16 b - 60
    (572 -> 388), VALID_MARGIN pixels lost on each side (predict with mirrored borders).
    """

    def __init__(self, n_channels=1, n_classes=1, bilinear=False, base=64, norm="batch", padding="same",
                 dropout=0.0):
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        self.base = base
        self.norm = norm
        self.padding = padding
        self.dropout = dropout
        pad = {"same": 1, "valid": 0}[padding]
        c = [base, base * 2, base * 4, base * 8, base * 16]
        factor = 2 if bilinear else 1  # bilinear upsampling keeps channels, so the bottom is halved
        self.inc = DoubleConv(n_channels, c[0], norm=norm, padding=pad)
        self.down1 = Down(c[0], c[1], norm, pad)
        self.down2 = Down(c[1], c[2], norm, pad)
        self.down3 = Down(c[2], c[3], norm, pad)
        self.down4 = Down(c[3], c[4] // factor, norm, pad)
        self.drop = nn.Dropout(dropout)  # the paper's dropout at the end of the contracting path
        self.up1 = Up(c[4], c[3] // factor, bilinear, norm, pad)
        self.up2 = Up(c[3], c[2] // factor, bilinear, norm, pad)
        self.up3 = Up(c[2], c[1] // factor, bilinear, norm, pad)
        self.up4 = Up(c[1], c[0], bilinear, norm, pad)
        self.outc = OutConv(c[0], n_classes)

    def config(self):
        """The arguments that rebuild this network; stored in every checkpoint."""
        return dict(n_channels=self.n_channels, n_classes=self.n_classes, bilinear=self.bilinear,
                    base=self.base, norm=self.norm, padding=self.padding, dropout=self.dropout)

    def forward(self, x):
        height, width = x.shape[2], x.shape[3]
        if self.padding == "valid":
            if any(side < 188 or (side - 124) % 16 for side in (height, width)):
                raise ValueError(f"the unpadded U-Net needs sides of 16 b + 124 pixels (188, 204, ..., 572, ...), "
                                 f"got {height}x{width}")
        elif min(height, width) < smallest_side(self.norm):
            raise ValueError(f"U-Net input must be at least {smallest_side(self.norm)} pixels a side with "
                             f"{self.norm} norm, got {tuple(x.shape[2:])}")
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.drop(self.down4(x4))
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
