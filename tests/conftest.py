import os
import sys

# Let tests import the shared helper modules that sit beside them.
sys.path.insert(0, os.path.dirname(__file__))
