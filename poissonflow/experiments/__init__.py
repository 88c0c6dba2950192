"""The study: does Poisson-flow uniformity make features better for a linear probe?

An application of the library, kept apart from it as flash-attention keeps `training/`: the
encoders, data sets, augmentations, self-supervised objectives, probes, result cache, reports
and plots of `poissonflow experiment` and `poissonflow ssl-experiment`. It needs the `study`
extra (`pip install "poissonflow[study]"`). The library never imports this package; only the
command line dispatches to it, lazily. Results and how they were produced: README.md here.
"""
