"""Convert a trained network into an SNN and measure it: ``python convert.py test --config configs/convert/NAME.yaml``."""

from csdlab.cli import convert_main

if __name__ == "__main__":
    convert_main()
