"""The pipeline: study configuration, stages, executors, the command line and the demo.

The top layer: it may import everything below it (the core and the features), and nothing
imports it.
"""
