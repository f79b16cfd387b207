"""The Train widget's training process: `python -m biounet.napari_plugin.training_process JOB EVENTS`
runs biounet.train with the keywords in the JSON file JOB and appends its progress, then its end or
its error in one line, to EVENTS (JSON lines) for the widget to read. A process of its own, started
as a program (not forked, not multiprocessing's spawn, which re-imports the caller's main script),
that imports the framework and not napari or Qt; SIGINT stops it after the step, as it stops
TrainUnetDataSet.py."""
import json
import sys

from biounet.napari_plugin.model_choice import one_line


def run_training(job, events):
    """biounet.train as `job` says, each event a JSON line appended to the file `events`."""
    import biounet

    def say(event):
        with open(events, "a") as out:
            out.write(json.dumps(event) + "\n")
    try:
        run = biounet.train(progress=say, **job)
        say(dict(kind="end", best=run.best, last=run.last, stopped=run.stopped, scores=run.scores))
    except BaseException as error:  # said in one line in the viewer
        say(dict(kind="error", message=one_line(error)))


if __name__ == "__main__":
    with open(sys.argv[1]) as job_file:
        run_training(json.load(job_file), sys.argv[2])
