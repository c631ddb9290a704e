"""Suite-wide settings. path="auto" never measures the compressed path's crossover inside the
suite (ops.crossover): it stays on the dense path unless the environment already forces a
crossover (ROBPRUNE_SPARSE_CROSSOVER=1 runs every auto call of the suite on the compressed path);
tests of the compressed path ask for it explicitly."""
import os

os.environ.setdefault("ROBPRUNE_SPARSE_CROSSOVER", "0")
