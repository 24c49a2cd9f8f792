"""Convert a trained network into an SNN and measure it: ``python convert.py test --config configs/convert/NAME.yaml``.

Errors a user can fix print one line; ``--debug`` (or ``CSDLAB_DEBUG=1``) shows the traceback.
"""

import sys

from csdlab.cli import convert_main, run_cli

if __name__ == "__main__":
    sys.exit(run_cli(convert_main))
