"""After training, the decisions a checkpoint's probabilities are taken at, fitted to the training
images and recorded in its metadata: the cell threshold for pixel accuracy (as an output shift), and
for membranes the seed threshold of the cells between them for the challenge's V_rand."""
import numpy as np

from biounet.evaluation.instances import object_method
from biounet.model import backend
from biounet.model.checkpoint import load_weights, update_meta
from biounet.prediction.inference import best_seeds, best_threshold, threshold_sweeps


def calibrate(model, checkpoints, train_set, config, rank, processes):
    """Record in each checkpoint (path, its weights) the output shift that puts probability 0.5 on
    the threshold with the best pixel accuracy on the training images. Weighted losses (--weight-map)
    bias the network towards membranes; this moves its decision back. For membranes also the seed
    threshold and least seed size of the cells (cells_of) with the best V_rand there, which keep
    neighbouring cells apart in the mask where the pixel threshold thins their membrane. Every process sweeps its
    share of the images (the shares' sums are the sweep of all); rank 0 writes."""
    mine = train_set.subset(range(rank, len(train_set), processes))
    seeds = object_method(config.data_format, config.instances, config.object_target) == "cells"
    for path, weights in checkpoints:
        load_weights(model, weights, path)
        model.eval()
        errors, v_rands = threshold_sweeps(model, mine, config.device, seeds=seeds)
        sums = np.array(backend.all_sum(errors.tolist() + v_rands.tolist(), config.device, processes)) / len(train_set)
        threshold, error, error_at_half = best_threshold(sums[:len(errors)])
        calibration = dict(output_shift=float(np.log(threshold / (1 - threshold))), calibrated_threshold=threshold)
        said = f"cell threshold {threshold:.2f} (pixel error there {error:.4f}, {error_at_half:.4f} at 0.5)"
        if seeds:
            (calibration["seed_threshold"], calibration["seed_size"]), v_rand = best_seeds(sums[len(errors):], threshold)
            said += (f", cells seeded above {calibration['seed_threshold']:.3f} in regions of at least "
                     f"{calibration['seed_size']} pixels (V_rand {v_rand:.4f})")
        if rank == 0:
            update_meta(path, **calibration)
        print(f"calibrated {path} on the training images: {said}")
