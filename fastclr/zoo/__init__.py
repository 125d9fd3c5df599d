"""The released SimCLR models (google-research/simclr) in fastclr: ``python -m fastclr.zoo``.

* :mod:`fastclr.zoo.catalog`: the release table (names, official top-1, parameters, bucket paths);
* :mod:`fastclr.zoo.tf1`: TensorFlow's checkpoint reader and the variable -> module mapping;
* :mod:`fastclr.zoo.graph`: which layer a released classifier reads, from the shipped graph;
* :mod:`fastclr.zoo.convert`: one release folder -> one fastclr file;
* :mod:`fastclr.zoo.evaluate`: top-1/top-5 and predictions with the official TF eval preprocessing;
* :mod:`fastclr.zoo.cli`: the command line.

Importing this package never imports TensorFlow: only ``convert`` does, from the ``tf`` extra.
"""
