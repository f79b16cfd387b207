"""The 23-layer U-Net (Ronneberger et al. 2015) as in the OneFlow ISBI example, for either backend.

Module and parameter names match the original OneFlow example's `UNet(1, 1, bilinear=False)`
(`inc`, `down1..down4`, `up1..up4`, `outc`), so its published checkpoint loads.
"""
from backend import F, flow, nn


def norm_layer(kind, channels):
    """BatchNorm as in the paper's U-Net; InstanceNorm (each image normalized by its own statistics)
    for small-batch training on crops, where BatchNorm's running statistics fail at inference."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm must be 'batch' or 'instance', not {kind!r}")


class DoubleConv(nn.Module):
    """(3x3 conv => norm => ReLU) * 2"""

    def __init__(self, in_channels, out_channels, mid_channels=None, norm="batch"):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1),
            norm_layer(norm, mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pool, then DoubleConv."""

    def __init__(self, in_channels, out_channels, norm="batch"):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, norm=norm))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upsample x (2x2 transposed conv or bilinear), pad it to the skip's size, concatenate, DoubleConv."""

    def __init__(self, in_channels, out_channels, bilinear=False, norm="batch"):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, norm)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels, norm=norm)

    def forward(self, x, skip):
        x = self.up(x)
        # Odd sizes: pooling floored them, so the upsampled map can be a pixel short of the skip.
        dy = skip.shape[2] - x.shape[2]
        dx = skip.shape[3] - x.shape[3]
        if dy or dx:
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

    Any input of at least 16x16 pixels works; the output has the input's height and width.
    """

    def __init__(self, n_channels=1, n_classes=1, bilinear=False, base=64, norm="batch"):
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        self.base = base
        self.norm = norm
        c = [base, base * 2, base * 4, base * 8, base * 16]
        factor = 2 if bilinear else 1  # bilinear upsampling keeps channels, so the bottom is halved
        self.inc = DoubleConv(n_channels, c[0], norm=norm)
        self.down1 = Down(c[0], c[1], norm)
        self.down2 = Down(c[1], c[2], norm)
        self.down3 = Down(c[2], c[3], norm)
        self.down4 = Down(c[3], c[4] // factor, norm)
        self.up1 = Up(c[4], c[3] // factor, bilinear, norm)
        self.up2 = Up(c[3], c[2] // factor, bilinear, norm)
        self.up3 = Up(c[2], c[1] // factor, bilinear, norm)
        self.up4 = Up(c[1], c[0], bilinear, norm)
        self.outc = OutConv(c[0], n_classes)

    def config(self):
        """The arguments that rebuild this network; stored in every checkpoint."""
        return dict(n_channels=self.n_channels, n_classes=self.n_classes,
                    bilinear=self.bilinear, base=self.base, norm=self.norm)

    def forward(self, x):
        if min(x.shape[2], x.shape[3]) < 16:
            raise ValueError(f"U-Net input must be at least 16x16 pixels, got {tuple(x.shape[2:])}")
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
