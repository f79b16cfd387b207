"""Several trained networks predicting as one (several checkpoints given to prediction): their
probabilities averaged. The ensemble's outputs are the logits of that average, so
that everything downstream (tiles, views, thresholds, objects) treats it as one network."""
from biounet.model.backend import flow, nn

EPSILON = 1e-6  # probabilities kept this far from 0 and 1, so that their logits stay finite


class Ensemble(nn.Module):
    """Networks of the same input, outputs and padding, whose probabilities are averaged."""

    def __init__(self, networks):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        first = networks[0]
        self.n_channels, self.n_classes, self.padding = first.n_channels, first.n_classes, first.padding
        self.norm = "instance" if any(net.norm == "instance" for net in networks) else first.norm  # the larger least side

    def forward(self, x):
        outputs = [net(x) for net in self.networks]
        if self.n_classes == 1:
            mean = sum(flow.sigmoid(out) for out in outputs) / len(outputs)
            mean = flow.clamp(mean, EPSILON, 1 - EPSILON)
            return flow.log(mean / (1 - mean))
        mean = sum(flow.softmax(out, dim=1) for out in outputs) / len(outputs)
        return flow.log(flow.clamp(mean, EPSILON, 1.0))
