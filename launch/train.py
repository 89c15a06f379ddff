"""Entry point for `accelerate launch launch/train.py ...` and `torchrun ... launch/train.py ...`."""

import sys

from luna_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
