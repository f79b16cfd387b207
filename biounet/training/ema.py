"""An exponential moving average of the network's weights (--ema): updated after every step,
validated and saved as best.npz in place of the raw weights, which go on training (and are what
last.npz holds for --resume; a resumed run starts its average again from them)."""
from contextlib import contextmanager

from biounet.model.backend import flow


class WeightAverage:
    """average = decay * average + (1 - decay) * weights, after every step; weights that are not
    parameters (none in our networks but BatchNorm's running statistics) are copied as they are."""

    def __init__(self, model, decay):
        self.decay = decay
        with flow.no_grad():
            self.average = {name: value.detach().clone() for name, value in model.state_dict().items()}

    def update(self, model):
        with flow.no_grad():
            for name, value in model.state_dict().items():
                if value.dtype.is_floating_point:
                    self.average[name].mul_(self.decay).add_((1 - self.decay) * value.detach())
                else:
                    self.average[name].copy_(value)

    @contextmanager
    def applied(self, model):
        """The model with the averaged weights inside the block, its own weights back after it."""
        own = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.load_state_dict(self.average)
        try:
            yield model
        finally:
            model.load_state_dict(own)
