"""Predict a mask for every image of a dataset (`bash test.sh` runs this; `biounet-predict` is the
same program, from any folder). See `python predict_unet_test.py --help`; the work is
biounet/prediction/."""
from biounet.commands.predict import main

if __name__ == "__main__":
    main()
