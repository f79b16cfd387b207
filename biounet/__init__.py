"""biounet: U-Net segmentation of cells, membranes and nuclei in microscopy images, on OneFlow or PyTorch.

    import biounet
    model = biounet.load_model("checkpoints/best.npz")
    result = model.predict(image)          # .probabilities, .mask, .objects
    biounet.train("train_image", "train_label", time_budget=5)
    biounet.evaluate(result.mask, truth)

The API is biounet/api.py; the command-line programs (biounet-train, biounet-predict ...) are
biounet/commands/. Importing the package imports no framework: the first call that needs one does.
"""
__version__ = "0.2.0"
__all__ = ["Model", "PredictionSettings", "Segmentation", "TrainingRun", "evaluate", "load_model", "train"]


def __getattr__(name):
    if name in __all__:
        from biounet import api
        return getattr(api, name)
    raise AttributeError(f"module 'biounet' has no attribute {name!r}")
