"""The Train widget's training process (spawned: it imports the framework, not napari or Qt)."""
from biounet.napari_plugin.model_choice import one_line


def run_training(job, updates, stop):
    """biounet.train as `job` says; its progress, then its end or its error in one line, put into `updates`."""
    import biounet
    try:
        run = biounet.train(progress=updates.put, stop=stop, **job)
        updates.put(dict(kind="end", best=run.best, last=run.last, stopped=run.stopped, scores=run.scores))
    except BaseException as error:  # said in one line in the viewer
        updates.put(dict(kind="error", message=one_line(error)))
