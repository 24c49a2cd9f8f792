"""Train a classifier: ``python train.py fit --config configs/train/quickstart.yaml`` (also validate/test).

Errors a user can fix print one line; ``--debug`` (or ``CSDLAB_DEBUG=1``) shows the traceback.
"""

import sys

from csdlab.cli import run_cli, train_main

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
