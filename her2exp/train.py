"""`python -m her2exp.train` and `torchrun -m her2exp.train`: the training command's public
module path, kept as the docs and every torchrun line name it. The work is
:mod:`her2exp.training.run`; the command line is :mod:`her2exp.cli.train`."""

from her2exp.cli.train import main
from her2exp.training.run import run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
