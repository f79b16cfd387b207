"""The training loop: the run the settled configuration describes, its checkpoints, validation,
resume and stop (one process of a data-parallel run, or the only one).
"""
import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from biounet.core.curves import plot_curves, read_log
from biounet.core.log import append_json, json_log_path
from biounet.core.processes import WorkersDied
from biounet.data.loader import BatchLoader, SegmentationDataset, intensity_levels, pick
from biounet.model import backend
from biounet.model.backend import flow
from biounet.model.checkpoint import (CheckpointError, input_normalization, load_checkpoint, load_weights,
                                      model_weights, restore_optimizer)
from biounet.model.losses import learning_rate, segmentation_loss
from biounet.model.meta import TrainingData
from biounet.model.unet import UNet
from biounet.prediction.inference import scores_v_rand, validate
from biounet.training.calibration import calibrate
from biounet.training.config import OBJECT_SCORES, ONE_CLASS_SCORES, Config, as_dict, data_facts, describe, settle
from biounet.training.data import at_object_size, for_objects, pixel_weights, read_data, training_sampler
from biounet.training.ema import WeightAverage


def validate_share(model, val_set, weights, config, class_weights, rank, processes):
    """inference.validate, the images shared over the processes with one class (its scores are means
    over images, so the shares' sums give the same result); with several classes every process
    validates all images (mean IoU comes from one confusion matrix)."""
    if processes == 1 or config.classes > 1:
        return validate(model, val_set, weights, config=config, class_weights=class_weights, device=config.device)
    mine = list(range(rank, len(val_set), processes))
    scores = validate(model, val_set.subset(mine), pick(weights, mine),
                      config=config, class_weights=class_weights, device=config.device) if mine else {}
    names = [name for name in ONE_CLASS_SCORES if name != "val_v_rand" or scores_v_rand(config, val_set)]
    names += OBJECT_SCORES if val_set.instances is not None else ()
    sums = backend.all_sum([scores.get(name, 0.0) * len(mine) for name in names], config.device, processes)
    return {name: total / len(val_set) for name, total in zip(names, sums)}


def improves(value, best, metric):
    if best is None:
        return True
    return value < best if metric.endswith(("loss", "error")) else value > best


class TrainingError(RuntimeError):
    """Training cannot go on (a diverged loss, nothing left to do); the message says why."""


class Stopped(Exception):
    """Training stopped as asked, last.npz written; `code` is the exit status of a script (128 + the signal)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopRequest:
    """Asks training to stop after the current step, with last.npz written: the first SIGINT or
    SIGTERM (handled while the run is the main thread's; a second one stops at once, and the
    checkpoints on disk stay whole: they are written atomically), or `event` (a threading.Event)
    set from another thread."""

    def __init__(self, event=None):
        self.event, self.received = event, None
        in_main_thread = threading.current_thread() is threading.main_thread()
        self.handlers = {number: signal.signal(number, self._request)
                         for number in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}

    @property
    def requested(self):
        return bool(self.received or (self.event is not None and self.event.is_set()))

    def restore(self):
        for number, handler in self.handlers.items():
            signal.signal(number, handler)

    def _request(self, number, frame):
        self.received = number
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)

    def stop(self, where):
        if self.received or not self.requested:  # a data-parallel process may stop for another's signal
            number = self.received or signal.SIGTERM
            raise Stopped(f"stopped by {signal.Signals(number).name} {where}; continue with --resume", 128 + number)
        raise Stopped(f"stopped as asked {where}; continue with resume=True", 128 + signal.SIGINT)


def check_loss(loss, first_loss, epoch, step, lr):
    """Stop on a loss that is not finite or has grown a thousandfold: the weights would be garbage."""
    if math.isfinite(loss) and (first_loss is None or loss <= 1000 * max(first_loss, 1e-3)):
        return
    start = "" if first_loss is None else f" (first step: {first_loss:.4g})"
    raise TrainingError(f"training loss {loss:.4g} at epoch {epoch + 1}, step {step + 1}{start}: training "
                        f"diverged; try a lower --lr than {lr:g}. Checkpoints of finished epochs are kept as they were")


def resume(path, model, optimizer, rng, config):
    """Load the run saved in `path` into model, optimizer and rng; returns (epochs done, best score,
    epochs without a better one, the position inside a stopped epoch or None, seconds trained so far)."""
    meta, weights, arrays = load_checkpoint(path)
    if meta["model"] != model.config():
        raise CheckpointError(f"{path}: model {meta['model']} differs from the flags' {model.config()}")
    written = meta.get("config", meta.get("args"))
    written_with = written.get("optimizer", "adam") if isinstance(written, dict) else None
    if written_with != config.optimizer:
        raise CheckpointError(f"{path}: written with --optimizer {written_with}; resume with the same")
    trained_on = input_normalization(meta)
    if trained_on != (config.normalize, config.percentiles):
        raise CheckpointError(f"{path}: trained on images normalized by {trained_on[0]} {trained_on[1]}, these by "
                              f"{config.normalize} {config.percentiles}: resume with the same --normalize")
    target = TrainingData.of(meta).object_target
    if config.instances and target != config.object_target:
        raise CheckpointError(f"{path}: trained for --object-target {target}; resume with the same")
    load_weights(model, weights, path)
    restore_optimizer(optimizer, meta, arrays, path)
    try:
        epochs_done, best, stale = int(meta["epoch"]), meta["best"], int(meta.get("stale_epochs", 0))
        partial = meta.get("partial")
        rng.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: holds no usable training state to resume ({type(err).__name__})")
    if epochs_done >= config.epochs and not partial and not config.time_budget:
        raise TrainingError(f"{path} has trained {epochs_done} epochs already: ask for more with --epochs")
    seconds = float(meta.get("trained_seconds", 0.0))
    if config.time_budget and not partial and config.time_budget * 60 - seconds < seconds / max(1, epochs_done):
        raise TrainingError(f"{path} has trained {seconds / 60:.1f} minutes of --time-budget {config.time_budget:g}, "
                            f"and an epoch does not fit in what is left: give a larger budget to train on")
    print(f"resumed from {path} after epoch {epochs_done}" + (f", step {partial['step']}" if partial else ""))
    return epochs_done, best, stale, partial, seconds


def report_epoch(epoch, scores, lr, seconds, improved, config, epochs):
    """The epoch's line in the log, its JSON line beside it, and progress.png redrawn. Run by the
    checkpoint folder's writer thread after the epoch's checkpoints are written: off the steps' path,
    and a line in the log means its epoch is on disk."""
    print(f"epoch {epoch + 1}/{epochs} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
          + f" time {seconds:.1f}s" + (" *best" if improved else ""))
    append_json(json_log_path(config.log), dict(epoch=epoch + 1, epochs=epochs, **scores, lr=lr,
                                                time=round(seconds, 2), best=improved))
    if not config.progress:
        return
    try:
        plot_curves(read_log(json_log_path(config.log)), config.progress)
    except (OSError, ValueError) as err:  # a picture must not stop training
        print(f"warning: {config.progress} not drawn ({err})", file=sys.stderr)


def prepare(flags, processes):
    """(config, rng, training set, validation set or None): the data read, the configuration settled
    from the flags, the data and the number of processes, printed, and logged as the run's first JSON line."""
    device = backend.resolve_device(flags.device)
    backend.seed_everything(flags.seed)
    rng = np.random.default_rng(flags.seed)
    data_format, train_set, val_set = read_data(flags, rng)
    train_set, val_set, object_size = at_object_size(flags, train_set, val_set)
    config = settle(flags, data_facts(data_format, train_set, val_set, object_size), device,
                    backend_name=backend.NAME, processes=processes)
    if config.instances:
        train_set, val_set = (for_objects(train_set, config.object_target),
                              val_set and for_objects(val_set, config.object_target))
    print(describe(config))
    if note := backend.cpu_speed_note(device, "bash train.sh", "trains 5-7x faster"):
        print(note)
    print(f"data: {len(train_set)} training pairs from {config.data_path} ({data_format}, "
          f"{config.channels} channel{'s' if config.channels > 1 else ''}, {config.classes} "
          f"class{'es' if config.classes > 1 else ''}, normalized by {config.normalize})"
          f", {len(val_set) if val_set else 0} for validation")
    if processes > 1:
        print(f"data parallel: {processes} processes, each {config.batch_size // processes} of the "
              f"{config.batch_size} images of a step, learning rate {config.lr:g} for the whole step")
    if flags.log:
        append_json(json_log_path(config.log), dict(event="resumed" if config.resume else "run", command=sys.argv,
                                                    time=time.strftime("%Y-%m-%d %H:%M:%S"), config=as_dict(config)))
    return config, rng, train_set, val_set


def build_network(config):
    """The U-Net and its optimizer as the configuration describes them."""
    model = UNet(n_channels=config.channels, n_classes=config.outputs, bilinear=config.bilinear, base=config.base,
                 norm=config.norm, padding=config.padding, dropout=config.dropout).to(config.device)
    if config.optimizer == "sgd":
        return model, flow.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    return model, flow.optim.Adam(model.parameters(), lr=config.lr)


def checkpoint_writer(folder, model, optimizer, rng, config, train_set, rank):
    """save(path, epoch, best, stale, with_optimizer=True, **more): the checkpoint of the run so far,
    written by rank 0 alone, with what --resume and prediction need to know of the run (a network
    trained on images divided by their type's range also keeps their types and intensity levels, so
    that prediction can map images of other types onto them: checkpoint.network_input)."""
    levels = dict(input_types=tuple(train_set.input_types),
                  input_levels=tuple(map(tuple, intensity_levels(train_set.images, config.percentiles))))
    data = TrainingData(format=config.data_format, img_size=config.img_size, ignore_index=config.ignore_index,
                        instance_labels=config.instance_labels, instances=config.instances,
                        object_size=config.object_size, object_target=config.object_target, normalize=config.normalize,
                        percentiles=tuple(config.percentiles), **(levels if config.normalize == "range" else {}))
    run = dict(best_metric=config.best_metric, input_scale=1.0, config=as_dict(config), data=data.as_meta())

    def save(path, epoch, best, stale, with_optimizer=True, **more):
        if rank == 0:
            folder.save(path, model, optimizer if with_optimizer else None, **{
                **run, "epoch": epoch, "best": best, "stale_epochs": stale, "rng": rng.bit_generator.state, **more})
    return save


def planned_epochs(config, epochs_done, epochs_run, seconds, rank, processes, seconds_before=0.0):
    """How many epochs fit --time-budget: those done, and as many more as the time left holds at the
    mean time of the `epochs_run` epochs this run took `seconds` for (after `seconds_before` of the
    run it resumed; all processes take rank 0's plan). The cosine schedule follows the plan."""
    left = config.time_budget * 60 - seconds_before - seconds
    more = max(0, int(left // (seconds / epochs_run))) if rank == 0 else 0
    return epochs_done + int(backend.all_sum([float(more)], config.device, processes)[0])


def set_learning_rate(optimizer, epoch, config, epochs):
    lr = learning_rate(epoch, config, epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def epoch_plan(partial, rng, pairs, draws=0):
    """(order of the pairs, first step, losses so far) of an epoch: a new permutation (with `draws`,
    as many permutations one after the other as give that many pairs), or for an epoch stopped midway
    (`partial`, from --resume) the same order from the next step on."""
    if partial:
        return np.array(partial["order"]), partial["step"], partial["losses"]
    if not draws:
        return rng.permutation(pairs), 0, []
    return np.concatenate([rng.permutation(pairs) for _ in range(-(-draws // pairs))])[:draws], 0, []


def step_batches(order, first_step, steps, epoch, config, rank, processes):
    """(this process's pairs, seed) of each step from `first_step`: the seed of a pair's crop and
    augmentation is (seed, epoch), and the step too where an epoch may draw a pair twice (--steps-per-epoch)."""
    for step in range(first_step, steps):
        indices = order[step * config.batch_size:(step + 1) * config.batch_size][rank::processes]
        yield indices, (config.seed, epoch) + ((step,) if config.steps_per_epoch else ())


def step_loss(net, batch, config, class_weights, stop, processes):
    """(loss tensor of this process's share of a batch, the step's mean loss over the processes,
    whether any process was asked to stop): one exchange per step, so every process agrees."""
    images, labels, weights = batch
    with backend.autocast(config.device, config.amp):
        logits = net(backend.to_tensor(images, config.device))
    loss = segmentation_loss(logits.float(), labels, weights, config=config, class_weights=class_weights,
                             device=config.device)
    loss_sum, stops = backend.all_sum([loss.item(), float(stop.requested)], config.device, processes)
    return loss, loss_sum / processes, stops > 0


def apply_gradients(optimizer, scaler, loss):
    optimizer.zero_grad()
    if scaler:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


@dataclass
class Run:
    """A training run's state as its epochs go by: what the configuration built, and where it stands."""
    config: Config
    rng: np.random.Generator
    train_set: SegmentationDataset
    val_set: Optional[SegmentationDataset]
    model: object
    optimizer: object
    net: object  # the model, or its data-parallel wrapper
    save: Callable  # checkpoint_writer's
    folder: object = None  # the RunFolder rank 0 writes into (None in the other processes)
    val_weights: object = None  # the validation images' pixel weights, or None
    class_weights: object = None  # the loss's class weights as a tensor, or None
    rank: int = 0
    processes: int = 1
    epochs: int = 0  # planned: --epochs, or as many as --time-budget holds
    epoch: int = 0  # epochs done
    best: Optional[float] = None
    stale: int = 0  # epochs without a better best_metric
    partial: Optional[dict] = None  # where a stopped epoch stood (--resume)
    best_weights: Optional[dict] = None  # best.npz's weights, kept for calibration
    ema: Optional[WeightAverage] = None  # the weights' moving average (--ema): validated and saved as best.npz
    seconds_before: float = 0.0  # trained by the runs this one resumed
    started: float = field(default_factory=time.perf_counter)
    first_loss: Optional[float] = None

    def paths(self):
        return tuple(os.path.join(self.config.checkpoint_dir, name) for name in ("last.npz", "best.npz"))

    def trained_seconds(self):
        return self.seconds_before + time.perf_counter() - self.started


def start_from(path, model):
    """Fine-tuning: the weights of the checkpoint at `path`, whose network must be the one built."""
    meta, weights, _ = load_checkpoint(path)
    if meta["model"] != model.config():
        differ = ", ".join(f"{key} {value} (this run: {model.config()[key]})" for key, value in meta["model"].items()
                           if model.config().get(key) != value)
        raise CheckpointError(f"--init-from {path}: its network differs from the one the flags build: {differ}")
    load_weights(model, weights, path)
    print(f"fine-tuning: starting from the weights of {path}")


def start_run(flags, folder, rank, processes):
    """The Run the flags ask for: data read, configuration settled, network built, and with
    --resume the state of checkpoint_dir/last.npz restored."""
    config, rng, train_set, val_set = prepare(flags, processes)
    model, optimizer = build_network(config)
    run = Run(config=config, rng=rng, train_set=train_set, val_set=val_set, model=model, optimizer=optimizer,
              net=backend.data_parallel(model, config.device) if processes > 1 else model,
              save=checkpoint_writer(folder, model, optimizer, rng=rng, config=config, train_set=train_set, rank=rank),
              folder=folder, val_weights=pixel_weights(val_set, config), class_weights=class_weights(config),
              rank=rank, processes=processes, epochs=config.epochs)
    if config.resume:
        last, best_path = run.paths()
        resumed = resume(last, model, optimizer, rng=rng, config=config)
        run.epoch, run.best, run.stale, run.partial, run.seconds_before = resumed
        if config.time_budget:  # what is left of the budget, planned as the run goes on
            run.epochs = run.epoch + 1
        if calibrating(config) and os.path.exists(best_path):
            run.best_weights = load_checkpoint(best_path)[1]
    elif config.init_from:
        start_from(config.init_from, model)
    run.ema = WeightAverage(model, config.ema) if config.ema else None
    return run


def averaged(run):
    """The run's model with the moving average of its weights inside the block (--ema), else as it is."""
    return run.ema.applied(run.model) if run.ema else contextlib.nullcontext(run.model)


def calibrating(config):
    """Whether the run ends with calibrate (then every process keeps best.npz's weights)."""
    return config.calibrate and config.outputs == 1


def train(flags, folder, stop, rank=0, processes=1, progress=None):
    """The run the flags ask for, into the RunFolder `folder`; `stop` (a StopRequest) ends it early,
    `progress` (a callable, or None) is told of every step and epoch (progress_event). In a
    data-parallel run every process trains on its share of each step and validates alike (so all
    take the same decisions); only rank 0 (holding `folder`) writes checkpoints and logs.
    Returns the last epoch's scores."""
    run = start_run(flags, folder, rank, processes)
    config, scores = run.config, {}
    sampler = training_sampler(run.train_set, pixel_weights(run.train_set, config), config)
    loader = BatchLoader(sampler, config.loader_workers)
    try:
        start_epoch = run.epoch
        while run.epoch < run.epochs:  # --time-budget plans the epochs as it goes
            begin = time.perf_counter()
            lr = set_learning_rate(run.optimizer, run.epoch, config, run.epochs)
            losses = train_epoch(run, loader, sampler, stop=stop, progress=progress)
            scores = dict(train_loss=float(np.mean(losses)))
            if run.val_set is not None and ((run.epoch + 1) % config.val_every == 0 or run.epoch + 1 == run.epochs):
                with averaged(run):
                    scores.update(validate_share(run.model, run.val_set, run.val_weights, config=config,
                                                 class_weights=run.class_weights, rank=rank, processes=processes))
            if config.time_budget:
                run.epochs = planned_epochs(config, run.epoch + 1, run.epoch + 1 - start_epoch,
                                            seconds=time.perf_counter() - run.started, rank=rank,
                                            processes=processes, seconds_before=run.seconds_before)
            improved = end_epoch(run, scores, lr, time.perf_counter() - begin)
            if progress:
                progress(dict(kind="epoch", epoch=run.epoch + 1, epochs=run.epochs, scores=scores, lr=lr,
                              best=improved))
            run.epoch += 1
            if stop_between_epochs(run, stop):
                break
    finally:
        loader.close()
    finish(run)
    return scores


def class_weights(config):
    return None if config.class_weights is None else backend.to_tensor(config.class_weights, config.device)


def train_epoch(run, loader, sampler, stop, progress):
    """One epoch's steps (from where a stopped one stood); returns the steps' losses. A stop
    request, or workers dying for good, saves last.npz midway and ends the run."""
    config, epoch = run.config, run.epoch
    run.model.train()
    order, first_step, losses = epoch_plan(run.partial, run.rng, len(sampler),
                                           config.steps_per_epoch * config.batch_size)
    run.partial = None
    # Alone, the last step takes what is left; data parallel, every process needs its equal share.
    steps = math.ceil(len(order) / config.batch_size) if run.processes == 1 else len(order) // config.batch_size
    batches = loader.batches(step_batches(order, first_step, steps, epoch=epoch, config=config, rank=run.rank,
                                          processes=run.processes))
    scaler, done = backend.grad_scaler(config.amp), first_step

    def save_midway():
        last = run.paths()[0]
        run.save(last, epoch, run.best, run.stale, partial=dict(step=done, order=order.tolist(), losses=losses),
                 trained_seconds=run.trained_seconds())
        if run.folder is not None:
            run.folder.flush()
        return f"in epoch {epoch + 1}, after step {done} of {steps}: {last} holds that state"
    try:
        for step, batch in zip(tqdm(range(first_step, steps), total=steps, initial=first_step, leave=False,
                                    desc=f"epoch {epoch + 1}/{run.epochs}", file=sys.stderr,
                                    disable=run.rank > 0), batches):
            loss, value, stop_now = step_loss(run.net, batch, config, class_weights=run.class_weights, stop=stop,
                                              processes=run.processes)
            # before the step: a NaN never reaches the weights
            check_loss(value, run.first_loss, epoch, step=step, lr=config.lr)
            run.first_loss = value if run.first_loss is None else run.first_loss
            apply_gradients(run.optimizer, scaler, loss)
            if run.ema:
                run.ema.update(run.model)
            losses.append(value)
            done = step + 1
            if progress:
                progress(dict(kind="step", epoch=epoch + 1, epochs=run.epochs, step=done, steps=steps, loss=value))
            if stop_now and done < steps:
                stop.stop(save_midway())
    except WorkersDied as err:
        if done == first_step:
            raise TrainingError(f"{err}; stopped before a step of epoch {epoch + 1}: checkpoints kept as they were")
        raise TrainingError(f"{err}; stopped {save_midway()}; continue with --resume")
    return losses


def end_epoch(run, scores, lr, seconds):
    """Keep track of the best score, write last.npz (and best.npz when it improved), and report the
    epoch in the background. Returns whether it improved."""
    config = run.config
    improved = config.best_metric in scores and improves(scores[config.best_metric], run.best, config.best_metric)
    if config.best_metric in scores:  # a validated epoch (or no validation set at all)
        run.best, run.stale = (scores[config.best_metric], 0) if improved else (run.best, run.stale + 1)
    last, best_path = run.paths()
    written_config = dict(as_dict(config), epochs=run.epochs)
    run.save(last, run.epoch + 1, run.best, run.stale, scores=scores, config=written_config,
             trained_seconds=run.trained_seconds())
    if improved:
        with averaged(run):
            run.best_weights = model_weights(run.model) if calibrating(config) else None
            run.save(best_path, run.epoch + 1, run.best, run.stale, with_optimizer=False, scores=scores,
                     config=written_config)
    if run.rank == 0:
        run.folder.in_background(report_epoch, run.epoch, scores, lr, seconds, improved, config, run.epochs)
    return improved


def stop_between_epochs(run, stop):
    """After an epoch: stop as asked (every process agrees), or early for --patience (returns True)."""
    config = run.config
    stop_now = backend.all_sum([float(stop.requested)], config.device, run.processes)[0] > 0
    if stop_now and run.epoch < run.epochs:
        if run.folder is not None:
            run.folder.flush()  # the epoch's line before the stop's
        stop.stop(f"after epoch {run.epoch}: {run.paths()[0]} holds it")
    if config.patience and run.stale >= config.patience:
        print(f"early stop: {config.best_metric} has not improved for {run.stale} epochs")
        return True
    return False


def finish(run):
    """The run's end: everything written, the checkpoints calibrated where asked, where they are said."""
    last, best_path = run.paths()
    if run.folder is not None:
        run.folder.flush()  # a write's error stops the run here, in a line; calibration rewrites the files
    if calibrating(run.config):
        checkpoints = ([(best_path, run.best_weights)] if run.best_weights else []) + [(last, model_weights(run.model))]
        calibrate(run.model, checkpoints, run.train_set, config=run.config, rank=run.rank, processes=run.processes)
    print(f"checkpoints: {best_path} (best {run.config.best_metric} {run.best:.4f}), {last}")
    backend.wait_for_all(run.config.device, run.processes)
