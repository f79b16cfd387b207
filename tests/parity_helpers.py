"""Code both sides of the parity tests run, each on its own framework."""
import numpy as np

from biounet.model import backend


def trained_a_little(model, seed, steps=3):
    """A few Adam steps on random data, so weights and BatchNorm statistics are not the initial ones."""
    backend.seed_everything(seed)
    rng = np.random.default_rng(seed)
    optimizer = backend.flow.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = backend.to_tensor(rng.random((2, 1, 48, 48)))
        y = backend.to_tensor(rng.random((2, 1, 48, 48)) > 0.5)
        loss = backend.F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def outputs(model, x):
    with backend.flow.no_grad():
        return backend.to_numpy(model.eval()(backend.to_tensor(x)))
