"""Check and describe training data before training on it (the loader itself is
biounet/data/loader.py): its layout, counts, image sizes and label values, and what training
makes of it.

    python dataloader.py                                   # train_image/ with train_label/
    python dataloader.py ../shared/data/dsb2018/stage1_train
    python dataloader.py train_image --augmented augmented.png --weight-map weights.png
"""
from biounet.commands.inspect import main

if __name__ == "__main__":
    main()
