"""Train a classifier: ``python train.py fit --config configs/train/quickstart.yaml`` (also validate/test)."""

from csdlab.cli import train_main

if __name__ == "__main__":
    train_main()
