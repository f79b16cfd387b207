"""Train the U-Net (`bash train.sh` runs this; `biounet-train` is the same program, from any
folder). See `python TrainUnetDataSet.py --help`; the work is biounet/training/."""
from biounet.commands.train import main

if __name__ == "__main__":
    main()
