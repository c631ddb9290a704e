"""python -m robprune_fast.bench"""
from . import main

main()
