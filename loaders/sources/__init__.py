"""Where images come from: ``folders`` (image folders, list files, the one label mapping), ``files``
(list-file lines, atomic writes), ``decode`` (the one CPU decoder), ``checks`` (is a file usable, for
the torch and DALI decoders), ``manifest`` (a .beton's manifest) and ``synthetic`` (generated test
images)."""
