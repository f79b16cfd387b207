"""The 23-layer U-Net (Ronneberger et al. 2015) this project trains, defined once in
biounet/model/unet.py on the framework UNET_BACKEND chose (biounet/model/backend.py).

    python unet.py                   # its convolution layers and parameter count
    python unet.py --base 32         # the narrower network of the CPU preset
    from unet import UNet            # the network itself (biounet.model.unet.UNet)
"""
from biounet.model.unet import UNet


def describe(model):
    """Lines naming each convolution layer (the paper's 23) and the parameter count."""
    convolutions = [(name, layer) for name, layer in model.named_modules()
                    if type(layer).__name__ in ("Conv2d", "ConvTranspose2d")]
    lines = [f"{number:2d}  {name:28s} {type(layer).__name__:16s} {layer.in_channels:4d} -> {layer.out_channels:4d}"
             f"  {'x'.join(map(str, layer.kernel_size))}" for number, (name, layer) in enumerate(convolutions, 1)]
    parameters = sum(p.numel() for p in model.parameters())
    return lines + [f"{len(convolutions)} convolution layers, {parameters:,} parameters"]


def main(argv=None):
    from biounet.core.cli import ArgumentParser, ranged
    p = ArgumentParser(description=__doc__)
    p.add_argument("--base", type=ranged(int, 1, 1024), default=64, help="channels of the top level (64 in the paper)")
    p.add_argument("--channels", type=ranged(int, 1, 64), default=1, help="input channels")
    p.add_argument("--classes", type=ranged(int, 1, 1024), default=1, help="output channels")
    args = p.parse_args(argv)
    print("\n".join(describe(UNet(n_channels=args.channels, n_classes=args.classes, base=args.base))))


if __name__ == "__main__":
    main()
