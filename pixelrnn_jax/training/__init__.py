"""Training: the config, the pmapped step, batches, the run directory, the loop,
multi-process runs and exporting a run's weights.

Only the ``train`` command imports the loop (``training.loop``); loading,
evaluating, predicting and plotting a saved model never import this package
except for ``training.config`` (a leaf) where they need a run's Config.
"""
